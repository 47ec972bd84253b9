"""What lets the stages run on models larger than one device or than memory allows: layer placement across
GPUs and CPU offload (placement), layer-by-layer streaming over cached activations (streaming), FSDP of the
cure's shared frozen weights (sharding), the cure's teacher signals cached on disk (teacher_cache), and mixed
precision with activation checkpointing (precision)."""
