"""Vision-tower facts that several families share, as mixins the family adapters combine with ``Adapter``.

:class:`ClipTower`: a CLIP-style tower with a CLS token as the LLaVA families use it (its layers, the feature
layer(s) and selection strategy from the config or the call, the attention projections, what the token meter
counts). LLaVA-1.5 and LLaVA-NeXT are both ``ClipTower`` + ``Adapter``, so neither inherits the other's layout code.
"""

from __future__ import annotations

from typing import Any

from ..engine.capture import AttentionParts, pooling_head, rows_per_sequence
from ..engine.select import feature_layer_indices
from ..errors import UnsupportedModelError


class ClipTower:
    """Tower facts of a LLaVA-family adapter; the adapter's ``__init__`` calls :meth:`_init_tower`."""

    def _init_tower(self, model) -> None:
        """Check the tower and keep what every call reads (called by the family adapter's ``__init__``)."""
        base = model.model
        tower = base.vision_tower
        encoder = getattr(tower, "encoder", None)
        if encoder is None or not hasattr(encoder, "layers") or not hasattr(tower.embeddings, "class_embedding"):
            raise UnsupportedModelError(
                f"{type(model).__name__} with a {type(tower).__name__} vision tower is not supported: tokensieve's "
                f"{self.family} adapter "
                "needs a CLIP-style tower (encoder.layers and a CLS token)"
            )
        self.base = base
        self.layers = encoder.layers
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)

    # -- model facts -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _strategy(self, enc: dict[str, Any]) -> str:
        return enc.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy

    def _feature_layer(self, enc: dict[str, Any]):
        spec = enc.get("vision_feature_layer")
        return self.model.config.vision_feature_layer if spec is None else spec

    def feature_layers(self, enc: dict[str, Any]) -> list[int]:
        """Non-negative hidden_states indices whose patch rows are concatenated into the features."""
        return list(feature_layer_indices(self._feature_layer(enc), self.num_layers))

    def vision_modules(self) -> tuple:
        return self.base.vision_tower, self.base.multi_modal_projector

    def meter_parts(self) -> tuple:
        return self.layers, [self.base.multi_modal_projector], pooling_head(self.base.vision_tower), rows_per_sequence

    def num_prefix(self, enc: dict[str, Any]) -> int:
        return 0 if self._strategy(enc) == "default" else 1

    @classmethod
    def feature_layers_of(cls, config) -> tuple[int, ...]:
        return feature_layer_indices(config.vision_feature_layer, cls.encoder_layers_of(config))

    @classmethod
    def prefix_of(cls, config) -> int:
        return 0 if config.vision_feature_select_strategy == "default" else 1

    @staticmethod
    def _attention_parts(layer) -> AttentionParts:
        attn = layer.self_attn
        return AttentionParts(attn.q_proj, attn.k_proj, attn.num_heads, attn.head_dim, float(attn.scale), attn.v_proj)
