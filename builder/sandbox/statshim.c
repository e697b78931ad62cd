/* LD_PRELOAD library for `mkfs.ext4 -d` (builder/fs/ext.py): every file mkfs stats reads as owned by 0:0,
   with atime and ctime at $MDI_SHIM_EPOCH, so the filesystem it writes has the image's owners and times
   and needs no second pass over every inode with debugfs. mtime, mode and size are left as they are.
   It also hides from llistxattr, under $MDI_SHIM_STORE (the staged store), the attributes Nix leaves on
   store files (builder/staging/measure.py HOST_LABELS): the build host's, never the image's. */
#undef _FILE_OFFSET_BITS
#undef _TIME_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

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

/* Nix's canonicalisePathMetaData leaves these alone (src/libstore/posix-fs-canonicalise.cc, ignoredAcls). */
static int host_label(const char *name) {
    return !strcmp(name, "security.selinux") || !strcmp(name, "system.nfs4_acl") || !strcmp(name, "security.csm");
}

/* Whether path (relative to the working directory, as mke2fs -d passes it) is $MDI_SHIM_STORE or below it. */
static int in_store(const char *path) {
    const char *store = getenv("MDI_SHIM_STORE");
    char full[PATH_MAX * 2];
    if (!store || !*store) return 0;
    if (path[0] == '/') {
        full[0] = 0;
    } else if (!getcwd(full, PATH_MAX)) {
        return 0;
    } else {
        strcat(full, "/");
    }
    strncat(full, path, PATH_MAX - 1);
    size_t n = strlen(store);
    return !strncmp(full, store, n) && (full[n] == '/' || full[n] == 0);
}

ssize_t llistxattr(const char *path, char *list, size_t size) {
    static ssize_t (*real)(const char *, char *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "llistxattr");
    ssize_t got = real(path, NULL, 0);
    if (got <= 0) return got;  /* the common case: no attribute, one call as without the shim */
    char *all = malloc(got);
    if (!all) { errno = ENOMEM; return -1; }
    got = real(path, all, got);
    if (got < 0) { free(all); return got; }
    int hide = 0;
    for (char *p = all; p < all + got; p += strlen(p) + 1) hide |= host_label(p);
    hide = hide && in_store(path);
    size_t out = 0;
    for (char *p = all; p < all + got; p += strlen(p) + 1) {
        size_t len = strlen(p) + 1;
        if (hide && host_label(p)) continue;
        if (size) {
            if (out + len > size) { free(all); errno = ERANGE; return -1; }
            memcpy(list + out, p, len);
        }
        out += len;
    }
    free(all);
    return out;
}
