"""edgeinfer: run large language models on devices that cannot hold them."""
