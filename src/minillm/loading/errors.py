class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or of an unsupported kind."""
