"""Custom operators.

ms_deform_attn/: multi-scale deformable attention, CUDA and CPU kernels plus a pure-PyTorch path
(`from models.ops.ms_deform_attn import ms_deform_attn`). Nothing is re-exported here: a name
`ms_deform_attn` in this namespace would shadow the subpackage.
"""
