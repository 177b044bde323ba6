"""HF LLaVA key spellings: detect the one a checkpoint uses and translate to/from a canonical form.

Checkpoints of ``LlavaForConditionalGeneration`` come in two top-level spellings and, for the
vision tower, with or without a ``vision_model.`` level:

==================  ====================================  ======================================
part                legacy (what save_pretrained writes)  new (in-memory since transformers 4.52)
==================  ====================================  ======================================
language model      ``language_model.model.X``            ``model.language_model.X``
LM head             ``language_model.lm_head.X``          ``lm_head.X``
vision tower        ``vision_tower[.vision_model].X``     ``model.vision_tower[.vision_model].X``
projector           ``multi_modal_projector.X``           ``model.multi_modal_projector.X``
==================  ====================================  ======================================

llava-hf's published checkpoints use legacy + ``vision_model``; transformers 5.23's
``save_pretrained`` of a freshly built model writes legacy *without* ``vision_model`` (it drops
the level in memory and only restores it for models it loaded with it). The converter works on
the canonical form (new spelling, no ``vision_model``) and remembers the input's spelling so an
export reproduces the input key set exactly.

``convert assemble`` reads the two parts of a LLaVA from separate checkpoints, each with its own
naming onto the same canonical keys (:class:`VisionPartNaming`, :class:`LMPartNaming`):

=====================================  =====================================================
part checkpoint                        stored key -> canonical key
=====================================  =====================================================
``CLIPVisionModel``/``SiglipVisionModel``  ``[vision_model.]X`` -> ``model.vision_tower.X``
``CLIPModel``/``SiglipModel``          ``vision_model.X`` -> ``model.vision_tower.X``; the text
                                       half (``text_model.*``, projections, logit scale) dropped
``*ForCausalLM``                       ``model.X`` -> ``model.language_model.X``; ``lm_head.X``
=====================================  =====================================================

transformers 5.x ``save_pretrained`` writes vision models without ``vision_model.``; published
checkpoints made with older versions carry it. Exports of the parts use the input's form.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from mm_megatron.checkpoint.errors import ConversionError

# canonical prefix -> legacy prefix (vision handled separately for the vision_model level)
_LEGACY = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.", "vision_tower."),
    ("model.image_newline", "image_newline"),  # LLaVA-NeXT / OneVision
)
_VISION = "model.vision_tower."


@dataclass(frozen=True)
class KeySpelling:
    """How a checkpoint spells its keys."""

    prefix: str = "legacy"
    """``legacy`` (``language_model.model.*``, ``vision_tower.*``) or ``model``
    (``model.language_model.*``, ``model.vision_tower.*``)."""
    vision_model_level: bool = False
    """Vision keys carry ``vision_model.`` after the tower prefix (llava-hf's published files)."""

    def to_dict(self) -> dict:
        """JSON form (stored in the mcore checkpoint's run config)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> KeySpelling:
        """Inverse of :meth:`to_dict` (None -> what transformers 5.23 save_pretrained writes)."""
        return cls(**d) if d else cls()

    def to_file(self, canonical: str) -> str:
        """Canonical key -> this spelling."""
        key = canonical
        if self.vision_model_level and key.startswith(_VISION):
            key = _VISION + "vision_model." + key[len(_VISION) :]
        if self.prefix == "legacy":
            for new, old in _LEGACY:
                if key.startswith(new):
                    return old + key[len(new) :]
        return key

    def to_canonical(self, key: str) -> str:
        """This spelling -> canonical key (keys outside the four parts are returned unchanged)."""
        if self.prefix == "legacy":
            for new, old in _LEGACY:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        if self.vision_model_level and key.startswith(_VISION + "vision_model."):
            key = _VISION + key[len(_VISION) + len("vision_model.") :]
        return key


def detect_spelling(keys: Iterable[str], where: str = "checkpoint") -> KeySpelling:
    """The spelling of a key set; ConversionError if it mixes spellings or matches none."""
    keys = list(keys)
    new = [k for k in keys if k.startswith(("model.", "lm_head."))]
    old = [
        k
        for k in keys
        if k.startswith(("language_model.", "vision_tower.", "multi_modal_projector."))
    ]
    if new and old:
        raise ConversionError(
            f"{where} mixes key spellings: {new[0]!r} (new) and {old[0]!r} (legacy)"
        )
    if not new and not old:
        sample = keys[0] if keys else "<no tensors>"
        raise ConversionError(
            f"{where} does not look like a LlavaForConditionalGeneration checkpoint: no "
            f"language_model/vision_tower/multi_modal_projector keys (first key {sample!r})"
        )
    prefix = "model" if new else "legacy"
    tower = "model.vision_tower." if new else "vision_tower."
    vis = [k for k in keys if k.startswith(tower)]
    with_level = [k for k in vis if k.startswith(tower + "vision_model.")]
    if with_level and len(with_level) != len(vis):
        odd = next(k for k in vis if not k.startswith(tower + "vision_model."))
        raise ConversionError(f"{where} mixes vision key spellings: {with_level[0]!r} and {odd!r}")
    return KeySpelling(prefix=prefix, vision_model_level=bool(with_level))


@dataclass(frozen=True)
class VisionPartNaming:
    """Keys of a stand-alone vision checkpoint (see the table above)."""

    prefix: str = ""
    """``vision_model.`` or empty (what transformers 5.x writes for a vision model)."""
    composite: bool = False
    """A ``CLIPModel``/``SiglipModel``: keys outside ``prefix`` (the text half) are dropped."""

    def to_canonical(self, key: str) -> str | None:
        """Stored key -> canonical, None for the text half of a composite model."""
        if key.startswith(self.prefix):
            return _VISION + key[len(self.prefix) :]
        return None if self.composite else key

    def to_file(self, canonical: str) -> str:
        """Canonical -> stored key."""
        return self.prefix + canonical.removeprefix(_VISION)

    @classmethod
    def detect(cls, keys: Iterable[str], composite: bool) -> VisionPartNaming:
        """The naming of a vision checkpoint's key set."""
        with_prefix = any(k.startswith("vision_model.") for k in keys)
        return cls("vision_model." if with_prefix or composite else "", composite)


_LM = "model.language_model."


@dataclass(frozen=True)
class LMPartNaming:
    """Keys of a stand-alone causal LM checkpoint (``model.X``, ``lm_head.X``)."""

    def to_canonical(self, key: str) -> str:
        """Stored key -> canonical (keys outside ``model.``/``lm_head.`` unchanged)."""
        if key.startswith("model."):
            return _LM + key[len("model.") :]
        return key

    def to_file(self, canonical: str) -> str:
        """Canonical -> stored key."""
        if canonical.startswith(_LM):
            return "model." + canonical[len(_LM) :]
        return canonical
