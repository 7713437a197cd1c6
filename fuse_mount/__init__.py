"""The data path: pyfuse3 Operations over the block store, the FUSE mount lifecycle, the
per-volume write barrier, and loop-device / read-only-mount helpers for exposing.

Submodules (import what you need; only operations/session/errors import pyfuse3):
    lunstore      LunStore: the Protocol of what fuse_mount needs from the array
    presentation  Presentation (LUN masking), LiveMount (what the control plane asks
                  of the mount)
    view          MountView: the tree, inode numbers, attributes, host masking (pure)
    loopdev       losetup/blkid/mount helpers, expose_mount()/unexpose_mount()
    errors        blockstore exception -> errno (the one place)
    barrier       WriteBarrier: flush & hold per volume, for the coordinator
    operations    ShadowOperations (pyfuse3.Operations): FUSE requests -> view / array
    session       run_mount(), mount_state(), wait_mounted(), force_unmount()

patches/ is not a module: the pyfuse3 3.5.0 fallocate patch and build-pyfuse3.sh, which
`make venv` uses to build the pyfuse3 this package needs (see operations' docstring).
"""
