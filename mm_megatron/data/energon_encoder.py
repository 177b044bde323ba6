"""Energon's task encoder for our samples: crude webdataset sample -> `Example` or `BadSample`.

What this file does: `EnergonTaskEncoder` cooks every crude sample energon reads (the raw bytes of
its `json` and `N.<ext>` members, undecoded) with the same `SampleProcessor` the webdataset
backend uses, and wraps the outcome in `CookedSample`, energon's `Sample` type for it. Bad
samples are not raised (energon would skip them uncounted): they travel as `BadSample` so the
loader counts and logs them like the webdataset backend does.

It is imported only when an energon dataset is used (importing megatron.energon takes seconds).

What it does not do: batch, pack or order samples (`energon.py` and energon itself).
"""

from __future__ import annotations

from typing import Any

from megatron.energon import Cooker, DefaultTaskEncoder, Sample, edataclass, stateless

from mm_megatron.data.samples import BadSample, BadSampleError, Example, SampleProcessor


@edataclass
class CookedSample(Sample):
    """One sample as energon carries it: our `Example`, or the `BadSample` saying why not."""

    item: Any = None
    """The `Example` or `BadSample` (its `position` is set by the loader)."""


class EnergonTaskEncoder(DefaultTaskEncoder):
    """Cooks crude samples with a `SampleProcessor`; batches of one pass through unchanged."""

    decoder = None  # the processor decodes the raw bytes itself

    def __init__(self, processor: SampleProcessor):
        """Args:
        processor: Tokenizes, checks and decodes one sample (shared with the webdataset backend).
        """
        super().__init__()
        self.processor = processor
        self.cookers = [Cooker(self.cook)]

    @stateless
    def cook(self, raw: dict) -> CookedSample:
        """Process one crude sample (a dict of member extension -> bytes)."""
        key = raw["__key__"]
        sources = raw.get("__sources__") or ()
        shard = str(sources[0].shard_name) if sources else "?"
        available = [k for k in raw if not k.startswith("__")]
        try:
            fields = self.processor(available, lambda ext: raw[ext])
            item: Example | BadSample = Example(key, shard, -1, *fields)
        except BadSampleError as e:
            item = BadSample(key, shard, -1, e.reason, e.detail)
        return CookedSample(
            __key__=key,
            __restore_key__=raw.get("__restore_key__"),
            __subflavors__=raw.get("__subflavors__"),
            __sources__=raw.get("__sources__"),
            item=item,
        )

    def batch(self, samples: list[Any]) -> Any:
        """Batches of one (energon's validation loader needs a batch size); we batch later."""
        return samples[0]
