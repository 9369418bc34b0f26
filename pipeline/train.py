"""Entry point kept for `python -m pipeline.train`: the direct Hydra run, in commands/experiment."""

from pipeline.commands.experiment import main

if __name__ == "__main__":
    main()
