#!/usr/bin/env python
"""Stand-alone entry: convert LLaVA-style JSON + an image folder into webdataset shards.

Same as `mm-megatron data convert`; all logic lives in `mm_megatron.data.llava_json`.

    python tools/llava_to_wds.py --json llava_v1_5_mix665k.json --image-folder /data/images \
        --out /data/wds/llava665k --prefix train --samples-per-shard 1000 --workers 8

Prints a report of skipped records (missing/unreadable image, broken record, placeholder
mismatch, empty conversation) and writes `<out>/<prefix>.bad_records.json`.
"""

import sys

from mm_megatron.data.llava_json import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
