"""Parts that know nothing of model families: attention, blocks, vision and text towers."""
