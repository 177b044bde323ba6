"""Chat templates: turn a LLaVA conversation into token ids and unshifted labels.

What this file does: implements the four templates in code (never through the tokenizer's own
jinja `chat_template`) and tokenizes a conversation segment by segment, so the loss mask is exact:

- `plain` (LLaVA stage 1, `preprocess_plain`): `[bos] <image>... caption\\n`, no eos; the human
  text is dropped except for its placeholders; loss on `caption\\n`. Records with several
  assistant turns have their answers joined with a newline.
- `vicuna_v1` (LLaVA-1.5 `--version v1`, `conv_vicuna_v1`, "curious user" system prompt):
  `[bos]SYSTEM USER: q ASSISTANT: a</s>USER: ...`; loss on ` a</s>`.
- `llama3`: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nq<|eot_id|>
  <|start_header_id|>assistant<|end_header_id|>\\n\\na<|eot_id|>`; loss on `a<|eot_id|>`; every
  message is stripped of surrounding whitespace, as the official template's `| trim` does.
- `chatml`: `<|im_start|>user\\nq<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>\\n`; loss on
  `a<|im_end|>` (the trailing newline is masked; Megatron-LM's convention, see the README).

In the chat templates a user turn with exactly one `<image>` has it moved to the front as
`<image>\\n` + the stripped rest (LLaVA's `preprocess_multimodal`); turns with several
placeholders keep them where the dataset put them (interleaved order carries meaning).

Marker strings such as `<|eot_id|>` are tokenized as ordinary text; a tokenizer that has them as
special tokens turns each into its one id, one that lacks them spells them out in pieces. Every
`<image>` in a user turn becomes exactly one `image_token_id`. Labels are -100 except on the
assistant answers and their end token; the first position is always -100.

What it does not do: images, truncation (over-long samples are rejected later), or generation-time
prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mm_megatron.data.batch import IGNORE_INDEX

USER_ROLES = ("human", "user")
"""Values of a turn's `from` that mean the user."""

ASSISTANT_ROLES = ("gpt", "assistant")
"""Values of a turn's `from` that mean the assistant."""

EOS = object()
"""Stands for the tokenizer's eos id in a template."""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA-1.5's system prompt (llava/conversation.py, conv_vicuna_v1, selected by --version v1)."""


class TemplateError(ValueError):
    """A record cannot be formatted; `reason` is the bad-sample counter it belongs to."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        """Short name of the failure, e.g. `empty_conversation`."""


@dataclass(frozen=True)
class ChatTemplate:
    """The fixed strings of a multi-turn chat format. Masked pieces have no loss."""

    name: str
    """Registry name."""

    add_bos: bool
    """Start with the tokenizer's bos id (or `bos_text` when it has none)."""

    bos_text: str | None
    """Text spelling the bos marker for tokenizers without a bos token; None to skip."""

    default_system: str | None
    """System prompt used when neither the config nor the record gives one."""

    system_format: str
    """Masked text holding `{system}`; emitted once, before the first turn."""

    user_prefix: str
    """Masked text before a user message."""

    user_suffix: str
    """Masked text after a user message."""

    assistant_prefix: str
    """Masked text before an assistant answer."""

    answer_prefix: str
    """Text glued in front of the answer, with loss (vicuna's separating space)."""

    assistant_end: Any
    """End-of-turn marker with loss: a string or `EOS`."""

    assistant_suffix: str
    """Masked text after the end marker."""

    trim: bool = False
    """Strip whitespace around every message (llama3's `| trim`)."""


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        add_bos=True,
        bos_text=None,
        default_system=VICUNA_SYSTEM,
        system_format="{system} ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT:",
        answer_prefix=" ",
        assistant_end=EOS,
        assistant_suffix="",
    ),
    "llama3": ChatTemplate(
        name="llama3",
        add_bos=True,
        bos_text="<|begin_of_text|>",
        default_system=None,
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
        user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_prefix="",
        assistant_end="<|eot_id|>",
        assistant_suffix="",
        trim=True,
    ),
    "chatml": ChatTemplate(
        name="chatml",
        add_bos=False,
        bos_text=None,
        default_system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_prefix="",
        assistant_end="<|im_end|>",
        assistant_suffix="\n",
    ),
}
"""Multi-turn templates by name; `plain` is handled by `_plain_segments`."""

TEMPLATE_NAMES = ("plain", *TEMPLATES)
"""Every name `tokenize_conversation` accepts."""


@dataclass
class TokenizedConversation:
    """Token ids of one conversation and its unshifted labels."""

    input_ids: list[int]
    """Token ids, one `image_token_id` per image."""

    labels: list[int]
    """Same length as input_ids; the token id where loss applies, else -100."""

    num_placeholders: int
    """How many image placeholders the text contains."""


def _split_turns(conversations: Any) -> tuple[str | None, list[tuple[str, str]]]:
    """Check the record's turns; return (system text or None, [(role, text)])."""
    if not isinstance(conversations, list) or not conversations:
        raise TemplateError("empty_conversation", "the record has no conversation turns")
    system = None
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise TemplateError("broken_record", f"turn {i} is not {{from, value: str}}: {turn!r}")
        role = turn.get("from")
        if role == "system" and i == 0:
            system = turn["value"]
        elif role in USER_ROLES:
            turns.append(("user", turn["value"]))
        elif role in ASSISTANT_ROLES:
            turns.append(("assistant", turn["value"]))
        else:
            raise TemplateError("broken_record", f"turn {i} has unknown role {role!r}")
    if not any(role == "assistant" for role, _ in turns):
        raise TemplateError("empty_conversation", "the record has no assistant turn")
    return system, turns


def _user_pieces(text: str, image_token: str, image_token_id: int) -> list[Any]:
    """Text pieces of a user message with each placeholder replaced by the image id."""
    pieces: list[Any] = []
    for j, part in enumerate(text.split(image_token)):
        if j:
            pieces.append(image_token_id)
        if part:
            pieces.append(part)
    return pieces


def image_to_front(text: str, image_token: str) -> str:
    """LLaVA's `preprocess_multimodal`: one placeholder moves to the front as `<image>\\n`.

    Text with no placeholder or several is returned unchanged.
    """
    if text.count(image_token) != 1:
        return text
    return (image_token + "\n" + text.replace(image_token, "").strip()).strip()


def _plain_segments(turns: list[tuple[str, str]], info: Any) -> list[tuple[Any, bool]]:
    # LLaVA's preprocess_plain: "<image>" + caption + "\n" (conv_llava_plain's sep), no eos.
    segments: list[tuple[Any, bool]] = []
    for role, text in turns:
        if role == "user":
            n = text.count(info.image_token)
            segments.extend((info.image_token_id, False) for _ in range(n))
    caption = "\n".join(text for role, text in turns if role == "assistant")
    segments.append((caption + "\n", True))
    return segments


def _chat_segments(
    template: ChatTemplate, system: str | None, turns: list[tuple[str, str]], info: Any
) -> list[tuple[Any, bool]]:
    segments: list[tuple[Any, bool]] = []
    if system and template.trim:
        system = system.strip()
    if system:
        segments.append((template.system_format.format(system=system), False))
    for role, text in turns:
        if template.trim:
            text = text.strip()
        if role == "user":
            segments.append((template.user_prefix, False))
            text = image_to_front(text, info.image_token)
            pieces = _user_pieces(text, info.image_token, info.image_token_id)
            segments.extend((piece, False) for piece in pieces)
            segments.append((template.user_suffix, False))
        else:
            segments.append((template.assistant_prefix, False))
            segments.append((template.answer_prefix + text, True))
            segments.append((template.assistant_end, True))
            segments.append((template.assistant_suffix, False))
    return segments


def _merge_text(segments: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """Drop empty strings and join neighbouring strings with the same loss flag."""
    merged: list[tuple[Any, bool]] = []
    for piece, target in segments:
        if isinstance(piece, str):
            if not piece:
                continue
            if merged and isinstance(merged[-1][0], str) and merged[-1][1] == target:
                merged[-1] = (merged[-1][0] + piece, target)
                continue
        merged.append((piece, target))
    return merged


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without bos/eos, through the fast backend when there is one.

    Args:
        tokenizer: A HF tokenizer.
        texts: Texts to encode separately.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # same ids as tokenizer(text), without the wrapper's overhead
        return [backend.encode(text, add_special_tokens=False).ids for text in texts]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []


def get_template(name: str) -> ChatTemplate | None:
    """The template called `name` (None for `plain`); ValueError for unknown names."""
    if name == "plain":
        return None
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {TEMPLATE_NAMES}")
    return TEMPLATES[name]


def tokenize_conversation(
    conversations: Any, info: Any, template: str, *, system_prompt: str | None = None
) -> TokenizedConversation:
    """Tokenize a LLaVA conversation with a chat template and build its loss mask.

    Args:
        conversations: The record's turns, `[{"from": "human"|"gpt"|..., "value": str}, ...]`.
        info: A `TokenizerInfo` (tokenizer, image token and its id, bos/eos ids).
        template: A name from `TEMPLATE_NAMES`.
        system_prompt: Overrides the template's default system prompt ("" for none); a record
            whose first turn is `from: system` overrides both.

    Raises:
        TemplateError: for records that cannot be formatted (the caller counts them as bad).
        ValueError: for an unknown template or a tokenizer lacking a needed token (setup errors).
    """
    chat = get_template(template)
    record_system, turns = _split_turns(conversations)
    for role, text in turns:
        if role == "assistant" and info.image_token in text:
            raise TemplateError("placeholder_mismatch", "an assistant turn contains a placeholder")
    if chat is None:
        segments = _plain_segments(turns, info)
        add_bos, bos_text = True, None
    else:
        system = chat.default_system if system_prompt is None else system_prompt
        if record_system is not None:
            system = record_system
        segments = _chat_segments(chat, system, turns, info)
        add_bos, bos_text = chat.add_bos, chat.bos_text
    if add_bos:
        if info.bos_token_id is not None:
            segments.insert(0, (info.bos_token_id, False))
        elif bos_text:
            segments.insert(0, (bos_text, False))
    segments = _merge_text(segments)

    encoded = iter(encode_texts(info.tokenizer, [p for p, _ in segments if isinstance(p, str)]))
    input_ids: list[int] = []
    labels: list[int] = []
    num_placeholders = 0
    for piece, target in segments:
        if piece is EOS:
            if info.eos_token_id is None:
                raise ValueError(
                    f"template {template!r} needs an eos token; the tokenizer has none"
                )
            ids = [info.eos_token_id]
        elif isinstance(piece, str):
            ids = list(next(encoded))
        else:
            ids = [piece]
            num_placeholders += piece == info.image_token_id
        input_ids.extend(ids)
        labels.extend(ids if target else [IGNORE_INDEX] * len(ids))
    # Nothing precedes position 0, so its label could never be predicted; keeping it -100 also
    # keeps the model's shift from putting loss across a packing boundary.
    labels[0] = IGNORE_INDEX
    return TokenizedConversation(input_ids, labels, num_placeholders)
