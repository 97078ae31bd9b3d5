"""Getting verified bytes onto a node: registry client, blob cache, background download, P2P tree."""
