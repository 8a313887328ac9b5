"""dsv3: a command-line toolkit for DeepSeek-V3-architecture models."""

__version__ = "0.1.0"
