/* LD_PRELOAD library for `mkfs.ext4 -d` (builder/fs/ext.py): every file mkfs stats reads as owned by 0:0,
   with atime and ctime at $MDI_SHIM_EPOCH, so the filesystem it writes has the image's owners and times
   and needs no second pass over every inode with debugfs. mtime, mode and size are left as they are. */
#undef _FILE_OFFSET_BITS
#undef _TIME_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/stat.h>

static long shim_epoch(void) {
    static long epoch = -1;
    if (epoch < 0) {
        const char *e = getenv("MDI_SHIM_EPOCH");
        epoch = e ? atol(e) : 0;
    }
    return epoch;
}

/* A macro, not a function: struct stat and struct stat64 differ on 32-bit platforms. */
#define FIX(rc, st)                                                     \
    do {                                                                \
        if ((rc) == 0) {                                                \
            (st)->st_uid = 0;                                           \
            (st)->st_gid = 0;                                           \
            (st)->st_atim.tv_sec = (st)->st_ctim.tv_sec = shim_epoch(); \
            (st)->st_atim.tv_nsec = (st)->st_ctim.tv_nsec = 0;          \
        }                                                               \
    } while (0)

/* Each wrapper calls the next definition of the same symbol (libc's) and fixes its result. */
#define WRAP(name, argdecl, args)                   \
    int name argdecl {                              \
        static int(*real) argdecl;                  \
        if (!real) real = dlsym(RTLD_NEXT, #name);  \
        int rc = real args;                         \
        FIX(rc, st);                                \
        return rc;                                  \
    }

WRAP(lstat, (const char *path, struct stat *st), (path, st))
WRAP(stat, (const char *path, struct stat *st), (path, st))
WRAP(fstatat, (int dirfd, const char *path, struct stat *st, int flags), (dirfd, path, st, flags))
WRAP(lstat64, (const char *path, struct stat64 *st), (path, st))
WRAP(stat64, (const char *path, struct stat64 *st), (path, st))
WRAP(fstatat64, (int dirfd, const char *path, struct stat64 *st, int flags), (dirfd, path, st, flags))
