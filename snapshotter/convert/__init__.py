"""Image conversion (`damselfly convert`): OCI layers in, damselfly block layers out (DESIGN §4).

`applytar` applies one OCI layer tar onto a mounted root filesystem with the image-spec's semantics.
"""
