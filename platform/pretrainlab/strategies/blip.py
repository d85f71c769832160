"""BLIP-style image-text model: one image encoder shared by a contrastive head, a matching head and a decoder.

Image side: ``cfg.model``'s timm backbone; its feature map (CNN) or tokens (ViT) are projected to
the decoder's width for cross-attention, its pooled features to the joint embedding space. Text
side (open_clip blocks, CoCa layout): a causal text transformer over the CLIP vocabulary plus
location tokens, and a multimodal decoder (causal self-attention, cross-attention to the image).

Losses, by what the rows carry (see :func:`pretrainlab.data.text.text_columns`):

- caption and retrieval rows: image-text contrastive (open_clip's ``ClipLoss``, global batch),
  image-text matching (the decoder's state at the end token, a 2-way head) on the true pairs, on
  hard negatives drawn from the batch by contrastive similarity (BLIP) and on the dataset's own
  hard-negative captions, and language modelling of the caption (captioning);
- VQA and grounding rows: language modelling of the answers, or of the boxes' four location tokens
  (Pix2Seq: boxes as tokens of the same decoder, so one model and one loss serve every task), of
  ``data.texts_per_image`` questions / objects per image, the image encoded once for them;
- grounding rows with ``strategy_params.box_head``: instead of location tokens, a one-stage box head
  (:class:`~pretrainlab.models.box_head.CellBoxHead`) on the decoder's state after ``EXPRESSION box:``
  picks the image cell of the object's centre and regresses its box from it.

The decoder's output layer is the token embedding, transposed (tied weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.text import DECODER_VOCAB_SIZE, FIRST_LOCATION_ID, generated_box, tokenizer
from pretrainlab.distributed import rank_and_world
from pretrainlab.metrics.grounding import grounding_scores
from pretrainlab.models.box_head import CellBoxHead
from pretrainlab.models.decoder import MultimodalDecoder
from pretrainlab.models.generation import Hypothesis, beam_search
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.models.text import TextTransformer, filled_length
from pretrainlab.strategy_params import BlipParams

TASK = "generation"
DATASET_TASKS = ("caption", "retrieval", "vqa", "grounding")
_TOKEN_COLUMNS = ("text", "negative_text", "sequence", "target_mask")


class BLIP(nn.Module):
    """Image encoder, text transformer, multimodal decoder and matching head; ``forward`` returns the losses."""

    init_report: LoadReport | None = None
    leaves_parameters_unused = True
    """VQA and grounding rows train the encoder and decoder only, not the contrastive and matching heads."""

    def __init__(self, backbone: nn.Module, params: BlipParams, context_length: int) -> None:
        super().__init__()
        if params.width % params.heads:
            raise ValueError(f"strategy_params.width {params.width} is not a multiple of heads {params.heads}")
        self.params = params
        self.context_length = context_length
        self.backbone = backbone
        channels = backbone.num_features
        self.image_tokens_proj = nn.Sequential(nn.Linear(channels, params.width), nn.LayerNorm(params.width))
        self.visual_proj = nn.Linear(channels, params.embed_dim, bias=False)
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=DECODER_VOCAB_SIZE,
            width=params.width,
            heads=params.heads,
            layers=params.text_layers,
            output_dim=params.embed_dim,
            output_tokens=True,
        )
        self.decoder = MultimodalDecoder(
            params.width, params.decoder_layers, params.heads, context_length, output_dim=params.width
        )
        nn.init.normal_(self.decoder.text_projection, std=params.width**-0.5)  # open_clip leaves it uninitialised
        self.itm_head = nn.Linear(params.width, 2)
        self.box_head = CellBoxHead(params.width) if params.box_head else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / params.init_temperature)))
        tok = tokenizer(context_length)
        self.start_id, self.end_id = tok.sot_token_id, tok.eot_token_id

    # --- encoders ---------------------------------------------------------------------------------------------------

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``N x tokens x width`` image tokens for cross-attention, ``N x channels`` pooled features)."""
        features = self.backbone.forward_features(images)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        return self.image_tokens_proj(tokens), self.backbone.forward_head(features, pre_logits=True)

    def image_cells(self, image_tokens: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image tokens that tile ``images`` (``N x rows*cols x width``, row by row, without class or register
        tokens) and their grid (rows, cols)."""
        cells = image_tokens[:, getattr(self.backbone, "num_prefix_tokens", 0) :]
        height, width = images.shape[-2:]
        rows = round(math.sqrt(cells.shape[1] * height / width))
        if rows * (cells.shape[1] // rows) != cells.shape[1]:
            raise ValueError(f"{cells.shape[1]} image tokens do not tile a {height} x {width} image in a grid")
        return cells, (rows, cells.shape[1] // rows)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``N x embed_dim`` image embeddings (the contrastive space)."""
        return F.normalize(self.visual_proj(self.image_features(images)[1]), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``N x embed_dim`` text embeddings (the contrastive space)."""
        return F.normalize(self.text(tokens[:, : filled_length(tokens)])[0], dim=-1)

    def decode(self, image_tokens: torch.Tensor, ids: torch.Tensor, owners: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's ``N x length x width`` states for token ids ``ids``, row ``i`` attending to the tokens of
        image ``owners[i]`` (each image's keys and values computed once), or to image row ``i`` without ``owners``."""
        return self.decoder(image_tokens, self.text(ids)[1], owners)

    def token_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits over the decoder vocabulary from decoder states (the tied token embedding)."""
        return states @ self.text.token_embedding.weight.T

    # --- losses -----------------------------------------------------------------------------------------------------

    def _lm_loss(self, states: torch.Tensor, ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each target token given the states one position before it."""
        taught = target_mask[:, 1:]
        logits = self.token_logits(states[:, :-1][taught])
        return F.cross_entropy(logits.float(), ids[:, 1:][taught], label_smoothing=self.params.label_smoothing)

    def _end_states(self, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return states[torch.arange(len(ids), device=ids.device), (ids == self.end_id).int().argmax(dim=1)]

    def _caption_losses(self, batch: dict[str, torch.Tensor], image_tokens, pooled) -> dict[str, torch.Tensor]:
        text = batch["text"]
        count = len(text)
        image_embeddings = F.normalize(self.visual_proj(pooled), dim=-1)
        text_pooled, text_tokens = self.text(text)  # once: the contrastive head and every pair share it
        text_embeddings = F.normalize(text_pooled, dim=-1)
        rank, world = rank_and_world()
        scale = self.logit_scale.exp()
        itc = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
            image_embeddings, text_embeddings, scale
        )
        pair_images, pair_tokens, pair_texts = [image_tokens], [text_tokens], [text]
        if count > 1:  # hard negatives from the batch, drawn by contrastive similarity (the true pair excluded)
            with torch.no_grad():
                similarity = (image_embeddings @ text_embeddings.T).float() * scale
                eye = torch.eye(count, dtype=torch.bool, device=text.device)
                similarity = similarity.masked_fill(eye, float("-inf"))
                negative_image = torch.multinomial(similarity.T.softmax(dim=1), 1).squeeze(1)
                negative_text = torch.multinomial(similarity.softmax(dim=1), 1).squeeze(1)
            pair_images += [image_tokens[negative_image], image_tokens]
            pair_tokens += [text_tokens, text_tokens[negative_text]]
            pair_texts += [text, text[negative_text]]
        if "negative_text" in batch:  # the dataset's hard-negative captions (all-zero rows: none)
            has = batch["negative_text"][:, 0] == self.start_id
            pair_images.append(image_tokens[has])
            pair_tokens.append(self.text(batch["negative_text"][has])[1])
            pair_texts.append(batch["negative_text"][has])
        ids = torch.cat(pair_texts)
        states = self.decoder(torch.cat(pair_images), torch.cat(pair_tokens))
        labels = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        labels[:count] = 1
        itm_logits = self.itm_head(self._end_states(states, ids))
        itm = F.cross_entropy(itm_logits.float(), labels)
        lm = self._lm_loss(states[:count], text, self._caption_mask(text))
        p = self.params
        return {
            "loss": p.itc_weight * itc + p.itm_weight * itm + p.lm_weight * lm,
            "log/itc_loss": itc.detach(),
            "log/itm_loss": itm.detach(),
            "log/lm_loss": lm.detach(),
            "log/itm_accuracy": (itm_logits.argmax(dim=1) == labels).float().mean(),
            "log/logit_scale": scale.detach(),
        }

    def _caption_mask(self, text: torch.Tensor) -> torch.Tensor:
        """Where a caption's decoder is taught: every token after the start token, the end token included."""
        positions = torch.arange(text.shape[1], device=text.device)
        return (positions >= 1) & (positions[None] <= (text == self.end_id).int().argmax(dim=1, keepdim=True))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = _without_padding(batch)
        image_tokens, pooled = self.image_features(batch["image"])
        if "text" in batch:
            return self._caption_losses(batch, image_tokens, pooled)
        if self._boxes_from_head(batch):
            losses = self.box_head.loss(*self._grounding_slots(batch, image_tokens))
            return {"loss": losses.pop("loss"), **{f"log/{name}": value for name, value in losses.items()}}
        lm = self._prompted_lm_loss(batch, image_tokens)
        return {"loss": lm, "log/lm_loss": lm.detach()}

    def _boxes_from_head(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the box head, not the decoder, answers this batch (``check_dataset``: only grounding rows)."""
        return self.box_head is not None and "sequence" in batch

    def _filled_slots(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image index of each of a VQA / grounding batch's ``N x K`` slots, which slots are filled), flat."""
        slots = batch["sequence"].shape[1]
        owners = torch.arange(len(batch["sequence"]), device=batch["sequence"].device).repeat_interleave(slots)
        return owners, batch["sequence"].flatten(0, 1)[:, 0] != 0

    def _prompted_lm_loss(self, batch: dict[str, torch.Tensor], image_tokens: torch.Tensor) -> torch.Tensor:
        """The language-modelling loss of a VQA / grounding batch's ``N x K x length`` sequences: every filled
        slot, decoded with its image's tokens."""
        owners, filled = self._filled_slots(batch)
        ids, mask = batch["sequence"].flatten(0, 1)[filled], batch["target_mask"].flatten(0, 1)[filled]
        return self._lm_loss(self.decode(image_tokens, ids, owners[filled]), ids, mask)

    def _box_queries(
        self, image_tokens: torch.Tensor, prompt_ids: torch.Tensor, lengths: torch.Tensor, owners: torch.Tensor
    ) -> torch.Tensor:
        """The decoder's state at the last token of each prompt (``start, EXPRESSION box:``) about image
        ``owners[i]``, ``M x width``."""
        states = self.decode(image_tokens, prompt_ids, owners)
        return states[torch.arange(len(prompt_ids), device=prompt_ids.device), lengths - 1]

    def _grounding_slots(self, batch: dict[str, torch.Tensor], image_tokens: torch.Tensor) -> tuple:
        """For the filled slots of a grounding batch, the box head's inputs and targets: (the decoder's state
        after each prompt, the cells of its image, the cells' grid, the true box)."""
        owners, filled = self._filled_slots(batch)
        ids = batch["sequence"].flatten(0, 1)[filled]
        lengths = batch["target_mask"].flatten(0, 1)[filled].int().argmax(dim=1)  # the first location token
        query = self._box_queries(image_tokens, ids, lengths, owners[filled])
        cells, grid = self.image_cells(image_tokens, batch["image"])
        return query, cells[owners[filled]], grid, batch["box"].flatten(0, 1)[filled].float()

    def lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's teacher-forced loss on the caption (``text``) or the answer / box (``sequence``) alone."""
        batch = _without_padding(batch)
        image_tokens, _ = self.image_features(batch["image"])
        if "text" in batch:
            ids, mask = batch["text"], self._caption_mask(batch["text"])
            return self._lm_loss(self.decode(image_tokens, ids), ids, mask)
        return self._prompted_lm_loss(batch, image_tokens)

    @property
    def validation_names(self) -> tuple[str, ...]:
        """The figures :meth:`validation_metrics` returns: known before any batch, so that a worker whose shard
        is empty still takes part in summing each of them over the workers."""
        return ("box_loss", "acc_iou50", "miou") if self.box_head is not None else ("lm_loss",)

    @torch.no_grad()
    def validation_metrics(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], int]:
        """What validation measures on ``batch`` (no cross-worker or random terms), and how many samples each
        figure averages: ``lm_loss`` (the decoder's teacher-forced loss) per image, or, for a box head on
        grounding rows, ``box_loss``, ``acc_iou50`` and ``miou`` (in %) per object."""
        if not self._boxes_from_head(batch):
            return {"lm_loss": self.lm_loss(batch).item()}, len(batch["image"])
        batch = _without_padding(batch)
        image_tokens, _ = self.image_features(batch["image"])
        query, cells, grid, target = self._grounding_slots(batch, image_tokens)
        loss = self.box_head.loss(query, cells, grid, target)["loss"]
        boxes, _ = self.box_head.predict(query, cells, grid)
        return {"box_loss": loss.item(), **grounding_scores(boxes, target)}, len(target)

    def after_step(self, step: int, total_steps: int) -> None:
        """Keeps the contrastive logit scale in ``[0, log 100]``."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(100.0))

    # --- inference --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def itm_scores(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Probability that each text (token ids) matches its image (row by row)."""
        return self.match_probability(self.image_features(images)[0], ids)

    @torch.no_grad()
    def match_probability(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`itm_scores` from image tokens (:meth:`image_features`), row by row."""
        ids = ids[:, : filled_length(ids)]
        return self.itm_head(self._end_states(self.decode(image_tokens, ids), ids)).softmax(dim=1)[:, 1]

    @torch.no_grad()
    def target_log_likelihood(
        self,
        image_tokens: torch.Tensor,
        ids: torch.Tensor,
        target_mask: torch.Tensor,
        owners: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per row, the decoder's log-probability of the target tokens of ``ids`` (where ``target_mask``, as
        :func:`~pretrainlab.data.text.prompted_sequences` marks them), each given the tokens before it and the
        image ``owners[i]`` (row ``i`` without ``owners``) of ``image_tokens``."""
        length = filled_length(ids)
        ids, target_mask = ids[:, :length], target_mask[:, :length]
        taught = target_mask[:, 1:]
        logits = self.token_logits(self.decode(image_tokens, ids, owners)[:, :-1][taught]).float()
        picked = logits.log_softmax(dim=1).gather(1, ids[:, 1:][taught][:, None]).squeeze(1)
        rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(taught)[taught]
        return torch.zeros(len(ids), device=ids.device).index_add_(0, rows, picked)

    @torch.no_grad()
    def predict_boxes(
        self,
        images: torch.Tensor,
        prompts: list[list[int]],
        num_beams: int = 1,
        owners: torch.Tensor | None = None,
    ) -> list[tuple[list[float], float]]:
        """The box of the object each prompt (start token + ``EXPRESSION box:`` ids) names in image ``owners[i]``
        (``images[i]`` without ``owners``), as
        ``x1 <= x2, y1 <= y2`` fractions of the image's width and height, with its score: the box head's
        probability of the chosen cell, or the decoder's mean log-probability of the four location tokens
        (searched with ``num_beams``; a box cut short by the context length is the empty box at the origin)."""
        if self.box_head is None:
            found = self.generate(images, prompts, 5, num_beams, boxes=True, owners=owners)
            return [(generated_box(hypotheses[0].tokens, 1.0, 1.0), hypotheses[0].score) for hypotheses in found]
        ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long, device=images.device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        lengths = torch.tensor([len(prompt) for prompt in prompts], device=images.device)
        owners = _image_of_each(prompts, owners, images.device)
        image_tokens, _ = self.image_features(images)
        cells, grid = self.image_cells(image_tokens, images)
        query = self._box_queries(image_tokens, ids, lengths, owners)
        boxes, scores = self.box_head.predict(query, cells[owners], grid)
        return [(box, score) for box, score in zip(boxes.tolist(), scores.tolist(), strict=True)]

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompts: list[list[int]],
        max_new_tokens: int,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        boxes: bool = False,
        owners: torch.Tensor | None = None,
    ) -> list[list[Hypothesis]]:
        """The decoder's continuations of ``prompts`` (start token + prompt ids), one list per prompt, best first;
        prompt ``i`` is about image ``owners[i]`` of ``images`` (``images[i]`` without ``owners``).

        ``boxes``: write four location tokens then end (grounding); else text tokens only.
        """
        image_tokens, _ = self.image_features(images)
        image_of_prompt = _image_of_each(prompts, owners, images.device)

        def log_probs(ids: torch.Tensor, positions: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
            states = self.decode(image_tokens, ids[:, : int(positions.max()) + 1], image_of_prompt[prompt])
            return self.token_logits(states[torch.arange(len(ids)), positions]).float().log_softmax(dim=1)

        vocab = torch.arange(DECODER_VOCAB_SIZE, device=images.device)
        text_tokens = (vocab > 0) & (vocab < FIRST_LOCATION_ID) & (vocab != self.start_id)  # 0 is padding
        location_tokens, end_token = vocab >= FIRST_LOCATION_ID, vocab == self.end_id

        def allowed(step: int) -> torch.Tensor:
            if not boxes:
                return text_tokens
            return location_tokens if step < 4 else end_token

        return beam_search(
            log_probs,
            prompts,
            self.context_length,
            self.end_id,
            5 if boxes else max_new_tokens,
            num_beams,
            length_penalty,
            allowed,
            images.device,
        )


def _image_of_each(prompts: list[list[int]], owners: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The image index of each prompt: ``owners``, or prompt ``i`` about image ``i``."""
    if owners is None:
        return torch.arange(len(prompts), device=device)
    if len(owners) != len(prompts):
        raise ValueError(f"got {len(owners)} image indices for {len(prompts)} prompts")
    return owners.to(device)


def _without_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with its token columns cut after the last position any of its texts fills (see
    :mod:`pretrainlab.models.text`)."""
    length = filled_length(*(batch[name] for name in ("text", "negative_text", "sequence") if name in batch))
    return {name: column[..., :length] if name in _TOKEN_COLUMNS else column for name, column in batch.items()}


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Raises ``DatasetError`` when ``box_head`` is set and the dataset is not a grounding dataset."""
    if BlipParams.model_validate(cfg.strategy_params).box_head and info["task"] != "grounding":
        raise DatasetError(
            f"strategy_params.box_head: {cfg.data.dataset} is a {info['task']} dataset; a box head trains on "
            "grounding datasets (set box_head: false)"
        )


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> BLIP:
    """The BLIP-style model on ``cfg.model``'s backbone; ``num_classes`` is unused."""
    params = BlipParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    model = BLIP(backbone, params, cfg.data.context_length)
    model.init_report = init_report
    return model
