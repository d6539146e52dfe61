"""Write the example photos as WebDataset shards (with a json caption per image), to try the streaming input:

    python examples/make_shards.py /tmp/shards        # /tmp/shards/000000.tar, 000001.tar
    s2 extract '/tmp/shards/{000000..000001}.tar' -o /tmp/feats/ --shard-size 3
"""
import json
import sys
from pathlib import Path

import webdataset as wds

out = Path(sys.argv[1] if len(sys.argv) > 1 else "shards")
out.mkdir(parents=True, exist_ok=True)
photos = sorted((Path(__file__).parent / "images").iterdir())
with wds.ShardWriter(str(out / "%06d.tar"), maxcount=4, verbose=0) as sink:
    for p in photos:
        sink.write({"__key__": p.stem, p.suffix[1:]: p.read_bytes(), "json": json.dumps({"caption": p.stem}).encode()})
print(f"{len(photos)} samples -> {sorted(x.name for x in out.glob('*.tar'))}")
