"""LLaVA assembly: vision encoder -> projector -> image-token merge -> megatron GPTModel.

Our own assembly class, not megatron's ``LLaVAModel`` (slower on the TE spec and unbuildable on
the local one). Layout decisions (which pipeline stage holds the encoder, pre/post process,
freezing, process groups) are made by :func:`mm_megatron.model.build.build_llava_model`; this
class only computes with what it is given.

Forward contract (all stages receive the same batch; see ``mm_megatron/data/batch.py``):
``images [N, 3, H, W]``, ``input_ids [b, s]`` with one placeholder per image, unshifted
``labels [b, s]`` (-100 = no loss), optional ``num_images [b]``, ``seq_lens [b, k]`` (packed).
Returns, on the last stage, ``(per_token_loss [b, s_out], loss_mask [b, s_out])`` when labels are
given, else logits ``[b, s_out, vocab]`` (TP-gathered, vocab padding stripped); on other stages
the hidden states for the next one.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.model.merge import MergePlan, merge_embeddings, plan_merge, shift_labels
from mm_megatron.model.projector import build_projector
from mm_megatron.model.specs import lm_layer_spec, vit_layer_spec
from mm_megatron.model.transformer_configs import rope_kwargs
from mm_megatron.model.vision import VisionEncoder


class LlavaModel(MegatronModule):
    """Vision encoder + projector (first stage only) and a pipelined GPT language model.

    Args:
        cfg: the model config.
        lm_config / vision_config / projector_config: megatron TransformerConfigs.
        pg_collection: process groups (tp, pp, cp, ...).
        pre_process: this stage embeds tokens (first PP stage).
        post_process: this stage computes logits/loss (last PP stage).
        add_encoder: this stage holds the vision encoder and projector.
        vp_stage: virtual pipeline stage index, if interleaved.
    """

    def __init__(
        self,
        cfg: LlavaConfig,
        lm_config: TransformerConfig,
        vision_config: TransformerConfig,
        projector_config: TransformerConfig,
        pg_collection: ProcessGroupCollection,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        add_encoder: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config=lm_config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.add_encoder = add_encoder
        self.pg_collection = pg_collection
        self.tp_size = lm_config.tensor_model_parallel_size
        self.sequence_parallel = lm_config.sequence_parallel
        self.padded_vocab_size = cfg.lm.padded_vocab_size(self.tp_size)
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=lm_layer_spec(cfg.lm.spec),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=cfg.lm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.lm.tie_embeddings,
            scatter_embedding_sequence_parallel=False,  # we scatter after the image merge
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            **rope_kwargs(cfg.lm),
        )
        self.share_embeddings_and_output_weights = cfg.lm.tie_embeddings
        self.vision_model = None
        self.vision_projection = None
        if add_encoder:
            self.vision_model = VisionEncoder(
                vision_config, cfg.vision, vit_layer_spec(cfg.vision.spec), pg_collection
            )
            self.vision_projection = build_projector(
                projector_config, cfg.projector, cfg.vision.hidden_size, pg_collection
            )
        self.tokens_per_image = cfg.tokens_per_image
        self.seq_multiple = self.tp_size if self.sequence_parallel else 1

    # megatron's schedules and DDP call these ------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous pipeline stage's activations."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """Tied embedding weight (for megatron's embedding-group all-reduce)."""
        return self.language_model.shared_embedding_or_output_weight()

    # ----------------------------------------------------------------------------------------
    def plan(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        min_seq_len: int = 0,
    ) -> MergePlan:
        """The merge layout for a batch (identical on every stage)."""
        return plan_merge(
            input_ids,
            self.cfg.image_token_id,
            self.tokens_per_image,
            num_images=num_images,
            labels=labels,
            seq_lens=seq_lens,
            seq_multiple=self.seq_multiple,
            min_seq_len=min_seq_len,
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> projected features [N, T, h_lm]."""
        return self.vision_projection(self.vision_model(images))

    def _decoder_input(self, images: torch.Tensor, input_ids: torch.Tensor, plan: MergePlan):
        ids = input_ids.clamp(0, self.padded_vocab_size - 1)
        text = self.language_model.embedding(input_ids=ids, position_ids=None)  # [s, b, h]
        text = text.transpose(0, 1)  # [b, s, h]
        if images is not None and images.shape[0] > 0:
            feats = self.encode_images(images)  # [N, T, h]
        else:
            feats = text.new_zeros(0, self.tokens_per_image, text.shape[-1])
        merged = merge_embeddings(text, feats, plan)  # [b, s_out, h]
        if plan.num_images == 0 and self.training:
            # NOTE: a batch without images must still touch every vision parameter (zero weight),
            # or data-parallel gradient reduction waits forever for their gradients.
            v = self.vision_model.config
            dummy = torch.zeros(
                1,
                self.cfg.vision.num_channels,
                self.cfg.vision.image_size,
                self.cfg.vision.image_size,
                dtype=v.params_dtype,
                device=merged.device,
            )
            merged = merged + 0.0 * self.encode_images(dummy).sum()
        merged = merged.transpose(0, 1).contiguous()  # [s_out, b, h]
        if self.sequence_parallel:
            merged = tensor_parallel.scatter_to_sequence_parallel_region(
                merged, group=self.pg_collection.tp
            )
        return merged

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        min_seq_len: int = 0,
    ):
        plan = self.plan(input_ids, labels, num_images, seq_lens, min_seq_len)
        decoder_input = None
        if self.pre_process:
            decoder_input = self._decoder_input(images, input_ids, plan)
        targets = loss_mask = None
        if plan.labels is not None:
            targets, loss_mask = shift_labels(plan.labels, plan.segment_lengths)
        out = self.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=None,
            decoder_input=decoder_input,
            labels=targets if self.post_process else None,
            runtime_gather_output=None if targets is not None else True,
        )
        if not self.post_process:
            return out  # hidden states for the next stage
        if targets is not None:
            return out, loss_mask  # per-token loss [b, s_out], mask [b, s_out]
        return out[..., : self.cfg.lm.vocab_size]  # [b, s_out, vocab]
