"""Entry point kept for `python -m pipeline.train`: the direct Hydra run, in commands/hydra_run."""

from pipeline.commands.hydra_run import main

if __name__ == "__main__":
    main()
