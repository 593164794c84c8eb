"""sparse-msda: sparse multi-scale deformable and neighborhood attention for spconv maps.

Layout:
    sparse_msda.inputs      -- validation/normalisation of the layers' public inputs
    sparse_msda.functional  -- the functional core (sampling, gathering, attention math)
    sparse_msda.modules     -- thin nn.Module layers and blocks on top of it
    sparse_msda.checkpoints -- loading sparse-transformer-layers checkpoints (the seed API's reference)
    sparse_msda.integrations -- OpenPCDet / mmdetection3d drop-in backbones (imported on demand)
    adapters                -- (separate package) spconv <-> COO conversion, hashed coordinate index
"""

from adapters import SparseCoordinateIndex

# --- deformable attention (issue 3) ---
from .functional.deformable import multilevel_sparse_bilinear_grid_sample, sparse_split_heads
from .modules.deformable_attention import SparseMSDeformableAttention, SparseMSDeformableAttentionBlock

# --- neighborhood attention (issue 4) ---
from .functional.windows import get_multilevel_neighborhoods
from .modules.neighborhood_attention import SparseNeighborhoodAttentionBlock
from .modules.self_attention import SparseMultilevelMapAttentionBlock
from .modules.token_self_attention import MultilevelSelfAttentionBlockWithRoPE

# --- encoder (issue 5) ---
from .modules.encoder import FeedForwardBlock, SparseMSDAEncoder, SparseMSDAEncoderLayer

# --- backbone levels <-> encoder width (issue 15; framework drop-ins: sparse_msda.integrations) ---
from .modules.level_projection import LevelBackProjection, LevelProjection

__all__ = [
    "SparseCoordinateIndex",
    # encoder (issue 5)
    "FeedForwardBlock",
    "SparseMSDAEncoder",
    "SparseMSDAEncoderLayer",
    # level projections (issue 15)
    "LevelBackProjection",
    "LevelProjection",
    # neighborhood attention (issue 4)
    "MultilevelSelfAttentionBlockWithRoPE",
    "SparseMultilevelMapAttentionBlock",
    "SparseNeighborhoodAttentionBlock",
    "get_multilevel_neighborhoods",
    # deformable attention (issue 3)
    "SparseMSDeformableAttention",
    "SparseMSDeformableAttentionBlock",
    "multilevel_sparse_bilinear_grid_sample",
    "sparse_split_heads",
]


def __getattr__(name):
    if name == "SparseMultilevelSelfAttentionBlock":
        from .modules import self_attention

        raise ImportError(self_attention._RENAMED)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
