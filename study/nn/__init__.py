"""The reference model: irrep layouts (`irreps`), the equivariant convolution model with its two
backends (`model`), and the fast tensor-product convolution (`fast_tp`) built from a plan of its
coupling paths (`fast_tp_plan`)."""
