"""Constants and bounds of Theorem A and Theorem C (see the guarantee chapter)."""
__all__: list[str] = []
