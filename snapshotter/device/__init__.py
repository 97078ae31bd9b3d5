"""The block-device side: the FUSE device filesystem, the devices behind it, and the device daemon."""
