"""Where the bytes live: resolving a source (:mod:`.source`), reading a checkpoint's tensors
(:mod:`.checkpoint`), safetensors reading and streaming writes (:mod:`.safetensors_io`), output shards (:mod:`.output`),
the locked, atomically published output directory (:mod:`.publish`), and source fingerprints (:mod:`.fingerprint`).
"""
