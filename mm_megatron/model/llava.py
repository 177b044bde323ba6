"""LLaVA assembly: vision encoder -> projector -> image-token merge -> megatron GPTModel.

Our own assembly class, not megatron's ``LLaVAModel`` (slower on the TE spec and unbuildable on
the local one). Layout decisions (which pipeline stage holds the encoder, pre/post process,
freezing, process groups) are made by :func:`mm_megatron.model.build.build_llava_model`; this
class only computes with what it is given.

Forward contract (all stages receive the same batch; see ``mm_megatron/data/batch.py``):
``images [N_tiles, 3, H, W]``, ``input_ids [b, s]`` with one placeholder per image, unshifted
``labels [b, s]`` (-100 = no loss), optional ``num_images [b]``, ``num_tiles [N]`` and
``image_tokens [N]`` (default: one tile per image, counted by ``ImageTokenCounter``),
``image_sizes [N, 2]`` (tiling schemes with an arrangement, e.g. anyres),
``seq_lens [b, k]`` (packed), ``expanded_lens`` (statistics only; ignored here).

With a tiling arrangement (``ImageTokenCounter.arrangement``, e.g. ``model/anyres.py``) the
first stage also holds the learned ``image_newline [h]`` and reassembles each image's tile
features (unpad, newline per row, base tile first) before the merge.
Returns, on the last stage, ``(per_token_loss [b, s_local], loss_mask [b, s_local])`` when labels
are given, else logits ``[b, s_local, vocab]`` (TP-gathered, vocab padding stripped); on other
stages the hidden states ``[s_local, b, h]`` for the next one (``s_local`` = this CP rank's share
of the padded expanded length, divided by TP under sequence parallelism).
"""

from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_megatron.config.model_config import LlavaConfig
from mm_megatron.model.image_tokens import ImageTokenCounter
from mm_megatron.model.merge import MergePlan, merge_embeddings, plan_merge, shift_labels
from mm_megatron.model.projector import build_projector
from mm_megatron.model.specs import block_spec, lm_layer_spec
from mm_megatron.model.transformer_configs import rope_kwargs
from mm_megatron.model.vision import build_vision_encoder
from mm_megatron.parallel.cp_padding import CPPadder, DecoderInputs


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
        pp_rank: this rank's pipeline stage (which LM layers it builds). The three ranks are
            required: the build function reads them from the process groups.
        tp_rank: this rank's TP rank (which vocab columns its output layer holds).
        cp_rank: this rank's CP rank (which zig-zag chunks of the sequence it keeps).
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
        pp_rank: int,
        tp_rank: int,
        cp_rank: int,
    ):
        super().__init__(config=lm_config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.add_encoder = add_encoder
        self.pg_collection = pg_collection
        self.tp_size = lm_config.tensor_model_parallel_size
        self.tp_rank = tp_rank
        self.sequence_parallel = lm_config.sequence_parallel
        self.padded_vocab_size = cfg.lm.padded_vocab_size(self.tp_size)
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=block_spec(
                lm_layer_spec(cfg.lm.spec),
                cfg.lm.spec,
                lm_config,
                vp_stage=vp_stage,
                pp_rank=pp_rank,
            ),
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
        self.model_type = ModelType.encoder_or_decoder  # megatron's schedules read this
        self.vp_stage = vp_stage
        self.vision_model = None
        self.vision_projection = None
        if add_encoder:
            self.vision_model = build_vision_encoder(vision_config, cfg.vision, pg_collection)
            self.vision_projection = build_projector(
                projector_config, cfg.projector, cfg.vision.feature_width, pg_collection
            )
        self.count_image_tokens = ImageTokenCounter.from_config(cfg)
        self.arrangement = self.count_image_tokens.arrangement
        self.image_newline = None
        if add_encoder and self.arrangement is not None:
            self.image_newline = torch.nn.Parameter(
                torch.empty(cfg.lm.hidden_size, dtype=projector_config.params_dtype)
            )
            torch.nn.init.normal_(self.image_newline, std=cfg.init_method_std)
        # Pads to the CP/SP shard factor, splits to this CP rank, scatters to the SP region.
        self.padder = CPPadder(
            tp=self.tp_size,
            cp=lm_config.context_parallel_size,
            sequence_parallel=self.sequence_parallel,
            cp_rank=cp_rank,
            tp_group=pg_collection.tp if self.sequence_parallel else None,
        )

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
        image_tokens: torch.Tensor | None = None,
    ) -> MergePlan:
        """The merge layout for a batch (identical on every stage).

        ``image_tokens`` [N] comes with every batch of the data pipeline; without it every image
        is one tile, counted by ``ImageTokenCounter``.
        """
        if image_tokens is None:
            if self.arrangement is not None and (input_ids == self.cfg.image_token_id).any():
                raise ValueError(
                    f"tiling.type={self.cfg.tiling.type!r}: the batch must carry image_tokens "
                    "(the count depends on each image's size)"
                )
            image_tokens = self.count_image_tokens()
        return plan_merge(
            input_ids,
            self.cfg.image_token_id,
            image_tokens,
            num_images=num_images,
            labels=labels,
            seq_lens=seq_lens,
            min_seq_len=min_seq_len,
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [N_tiles, C, H, W] -> projected features [N_tiles, T', h_lm], one encoder call."""
        return self.vision_projection(self.vision_model(images))

    def arrange_features(self, feats, num_tiles, image_sizes) -> torch.Tensor:
        """Projected tile features [N_tiles, T', h] -> image embeddings [sum(image_tokens), h]."""
        if self.arrangement is None:
            return feats.flatten(0, 1)  # tiles consecutive per image, images in order
        if num_tiles is None or image_sizes is None:
            raise ValueError(
                f"tiling.type={self.cfg.tiling.type!r} needs num_tiles and image_sizes in the batch"
            )
        tiles, sizes = num_tiles.tolist(), image_sizes.tolist()
        if sum(tiles) != feats.shape[0]:
            raise ValueError(f"num_tiles sums to {sum(tiles)} for {feats.shape[0]} image tiles")
        out = []
        for i, (f, hw) in enumerate(zip(feats.split(tiles), sizes)):
            self.arrangement.check_tiles(f.shape[0], hw, i)
            out.append(self.arrangement.arrange(f, hw, self.image_newline))
        return torch.cat(out)  # [sum(image_tokens), h]

    def _merged_embeddings(
        self, images, input_ids, plan: MergePlan, num_tiles=None, image_sizes=None
    ) -> torch.Tensor:
        """Text + image embeddings, expanded: [b, s_out, h]."""
        ids = input_ids.clamp(0, self.padded_vocab_size - 1)
        text = self.language_model.embedding(input_ids=ids, position_ids=None)  # [s, b, h]
        text = text.transpose(0, 1)  # [b, s, h]
        if images is not None and images.shape[0] > 0:
            # tiles of an image are consecutive, images in placeholder order: image-major rows
            feats = self.encode_images(images)  # [N_tiles, T', h]: one call for every tile
            feats = self.arrange_features(feats, num_tiles, image_sizes)  # [sum tokens, h]
        else:
            feats = text.new_zeros(0, text.shape[-1])
        merged = merge_embeddings(text, feats, plan)  # [b, s_out, h]
        if plan.num_images == 0 and self.training:
            # NOTE: a batch without images must still touch every vision parameter (zero weight),
            # or data-parallel gradient reduction waits forever for their gradients.
            v = self.cfg.vision
            dummy = torch.zeros(
                1,
                v.num_channels,
                v.input_image_size,
                v.input_image_size,
                dtype=self.vision_model.config.params_dtype,
                device=merged.device,
            )
            merged = merged + 0.0 * self.encode_images(dummy).sum()
            if self.image_newline is not None:
                merged = merged + 0.0 * self.image_newline.sum()
        return merged

    def prepare_decoder_inputs(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        min_seq_len: int = 0,
        image_tokens: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> DecoderInputs:
        """Merge, shift labels, pad for CP/SP, split to this CP rank, scatter to SP.

        Packed batches (``seq_lens`` given) are flattened into one THD sequence: every
        sub-sequence of every row, each padded on its own.
        """
        plan = self.plan(input_ids, labels, num_images, seq_lens, min_seq_len, image_tokens)
        b = input_ids.shape[0]
        if plan.labels is not None:
            targets, loss_mask = shift_labels(plan.labels, plan.segment_lengths)
        else:
            targets, loss_mask = None, torch.ones(b, plan.seq_len, device=input_ids.device)
            valid = (
                torch.arange(plan.seq_len, device=input_ids.device)[None] < plan.lengths[:, None]
            )
            loss_mask = loss_mask * valid
        emb = (
            self._merged_embeddings(images, input_ids, plan, num_tiles, image_sizes)
            if self.pre_process
            else None
        )
        seg = None
        if plan.segment_lengths is not None:
            seg = plan.segment_lengths[plan.segment_lengths > 0]  # [n_seq]
            ends = plan.segment_lengths.sum(1)  # [b]
            keep = torch.arange(plan.seq_len, device=input_ids.device)[None] < ends[:, None]
            # [b, s_out, ...] -> [1, t, ...], row-major = sub-sequence order
            emb = None if emb is None else emb[keep].unsqueeze(0)
            targets = None if targets is None else targets[keep].unsqueeze(0)
            loss_mask = loss_mask[keep].unsqueeze(0)
        if emb is not None:
            emb = emb.transpose(0, 1).contiguous()  # [s, b, h]
        return self.padder.prepare(emb, targets, loss_mask, seq_lengths=seg)

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        min_seq_len: int = 0,
        image_tokens: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        expanded_lens: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ):
        # num_tiles / image_sizes: only a tiling arrangement reads them (tiles are consecutive
        # per image, so the flat tile order already is the image order); expanded_lens is for
        # statistics.
        del expanded_lens
        di = self.prepare_decoder_inputs(
            images,
            input_ids,
            labels,
            num_images,
            seq_lens,
            min_seq_len,
            image_tokens,
            num_tiles,
            image_sizes,
        )
        padded = self.padded_vocab_size != self.cfg.lm.vocab_size
        out = self.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=None,
            decoder_input=di.embeddings,
            labels=di.labels if self.post_process and not padded else None,
            packed_seq_params=di.packed_seq_params,
            runtime_gather_output=di.labels is None,
        )
        if not self.post_process:
            return out  # hidden states for the next stage
        if di.labels is None:
            return out[..., : self.cfg.lm.vocab_size]  # [b, s_local, vocab]
        if padded:
            # NOTE: megatron's vocab padding must not take part in the softmax (HF's loss, and
            # a loss independent of TP): mask the padded columns, then the vocab-parallel CE.
            logits = out.transpose(0, 1)  # [b, s, v/tp] -> [s, b, v/tp]
            v_local = logits.shape[-1]
            start = self.tp_rank * v_local
            col = torch.arange(start, start + v_local, device=logits.device)
            logits = logits.masked_fill(
                col >= self.cfg.lm.vocab_size, torch.finfo(logits.dtype).min
            )
            out = self.language_model.compute_language_model_loss(di.labels, logits)
        return out, di.loss_mask  # per-token loss [b, s_local], mask [b, s_local]
