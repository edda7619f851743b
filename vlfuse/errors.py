"""Exceptions raised at the library's boundaries. Each message says what was wrong and what to do."""


class VlfuseError(Exception):
    """Base class for every error vlfuse raises on bad input."""


class ConfigError(VlfuseError):
    """A config file, key or value is invalid."""


class ImageError(VlfuseError):
    """An image file could not be used (missing, empty, corrupt, not an image, too large)."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed (e.g. a decompression bomb)."""


class VideoError(VlfuseError):
    """A video file could not be used (missing, empty, not a video, no video stream, unsupported codec, ...)."""


class VideoTooLongError(VideoError):
    """A video is longer, or its frames larger, than allowed."""


class DataError(VlfuseError):
    """A dataset file or directory is missing or malformed."""


class ModelNotFoundError(VlfuseError):
    """A model name or checkpoint directory could not be resolved."""


class InputError(VlfuseError):
    """User text or parameters (question, query, k, ...) are invalid."""
