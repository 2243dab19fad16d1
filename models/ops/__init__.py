"""Custom operators, chiefly multi-scale deformable attention (`openset::ms_deform_attn`) with its
reference, CPU, GPU and ONNX forms."""
