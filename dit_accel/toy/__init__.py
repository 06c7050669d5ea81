"""A small trained video DiT (a stock diffusers Wan transformer) so renders and sweeps mean something offline."""

from .data import make_batch, make_sample
from .pipeline import ToyVideoPipeline, ToyVideoPipelineOutput
from .text import VOCAB, ToyTextEncoder, ToyVocabularyWarning

__all__ = [
    "VOCAB",
    "ToyTextEncoder",
    "ToyVideoPipeline",
    "ToyVideoPipelineOutput",
    "ToyVocabularyWarning",
    "make_batch",
    "make_sample",
]
