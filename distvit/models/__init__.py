"""Models: pure nn.Modules with timm's names and state-dict layout, built by name.

    model = distvit.models.create("vit_small_patch16_224", num_classes=10, checkpoint="w.safetensors")
    distvit.models.list_models("vit_base_*")
"""
from distvit.models import vit  # noqa: F401  (registers the ViT family)
from distvit.models import causal_vit  # noqa: F401  (registers the causal ViT: vit_causal_*)
from distvit.models import swin  # noqa: F401  (registers the Swin family: swin_*)
from distvit.models import deit  # noqa: F401  (registers DeiT, distilled DeiT and DeiT III: deit_*, deit3_*)
from distvit.models.registry import create, is_model, list_models, model_entrypoint, register_model
from distvit.models.vit import VisionTransformer, checkpoint_filter_fn
from distvit.models.weights import LoadReport, WeightsMismatchError, load_checkpoint, load_state_dict, resample_abs_pos_embed

__all__ = [
    "LoadReport", "VisionTransformer", "WeightsMismatchError", "checkpoint_filter_fn", "create", "is_model",
    "list_models", "load_checkpoint", "load_state_dict", "model_entrypoint", "register_model",
    "resample_abs_pos_embed",
]
