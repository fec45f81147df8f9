"""The autograd layer: the fused loss on logits (``fused``, ``small``), the fused-linear
operator (``linear_op``, its chunk loop ``linear_chunks``), the length-N step
(``coefficients``), the output head (``head``) and the value checks run inside them
(``checks``). Ops run on a backend (``unisd_fast.backends``) and import none of the API
modules."""
