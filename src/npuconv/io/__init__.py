"""Where the bytes live: resolving a source (:mod:`.source`), reading a checkpoint's tensors
(:mod:`.checkpoint`), safetensors reading and streaming writes (:mod:`.safetensors_io`), output shards
and the atomic output directory (:mod:`.output`), and source fingerprints (:mod:`.fingerprint`).
"""
