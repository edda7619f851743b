"""Caption-to-caption similarity: CIDEr-D with a fixed corpus idf, sentence BLEU, and the consensus score built
from them. Shared by SCST rewards (training), consensus reranking (inference) and evaluation; it depends on
nothing else in vlfuse, so every layer may use it."""
