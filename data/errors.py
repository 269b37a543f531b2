"""The one exception the data pipeline raises for bad inputs."""


class DataError(ValueError):
    """A data input is unusable. The message names the file, key or value at fault, so a run that
    stops on it can be fixed without reading a traceback."""
