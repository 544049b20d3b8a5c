"""Files hf_posenc writes next to a converted checkpoint's weights (see :mod:`hf_posenc.hub_code`)."""
