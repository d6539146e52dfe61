"""The input side: an input spec -> units of keyed samples -> decoded, fitted images, module by module:
samples (the Sample record, failure records) -> listing (folders, path lists), wds (WebDataset shards) -> units
(Unit, Input) -> resolve (`open_input`: the kind detected, units listed) ; reading (bytes with retries, headers)
-> decode (Pillow, videos' frames, `--decode torch` probe; pixels through `s2cli.pixels`) -> loader (the decode
stage: torch DataLoader workers)."""
