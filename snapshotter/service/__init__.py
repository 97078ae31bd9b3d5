"""The gRPC Snapshots service: `server` (the gRPC face and its error codes), `snapshots` (the calls),
`metadata` (the SQLite store), `transaction` (containerd's rules per call), `records` (what a snapshot
is), `filters` (containerd's filter syntax), `overlay` (the directories and overlay mounts)."""
