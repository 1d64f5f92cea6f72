"""No-skip collapse, the consensus lemma and the 2-token example (see the necessity chapter)."""
__all__: list[str] = []
