"""tuner's Hydra sweeper: ``hydra/sweeper=tuner`` (see ``tuner.sweeper``)."""
