"""Configuration: the typed sections of the composed config, the command line, resolvers, the Hydra job."""
