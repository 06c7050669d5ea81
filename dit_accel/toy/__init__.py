"""A small trained video DiT (a real diffusers ``WanTransformer3DModel``) so renders and sweeps mean something offline."""
