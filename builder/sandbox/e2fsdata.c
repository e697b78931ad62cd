/* LD_PRELOAD library for mkfs.ext4 -d (builder/sandbox/e2fsdata.py): file data goes from each source file
   into the image inside the kernel (FICLONERANGE, else copy_file_range, else sendfile), never through
   mkfs' buffers; mkfs still allocates every block and writes every inode, extent, directory and bitmap.

   e2fsprogs 1.47.0's copy_file (misc/create_inode.c) opens the new inode with ext2fs_file_open, reads the
   source in 64 KiB chunks with pread64 (over the data ranges SEEK_DATA/SEEK_HOLE report), leaves a hole
   for every all-zero block (memcmp against a zero block) and hands each other block to ext2fs_file_write;
   libext2fs (lib/ext2fs/fileio.c) allocates it and writes it, and unix_io (lib/ext2fs/unix_io.c) puts it
   into the image with pwrite, through its write cache. mke2fs and libext2fs call all of these through the
   PLT, so the definitions here take those calls. While a file is open for writing, a pread64 of its
   source gives, for each block: zeros where the source block is zero (looked at through a read-only
   mapping, so the holes are the ones mkfs makes without this library), the source's own bytes where only
   a tail of under TAG_LEN bytes is left, and else a tag naming the file and block. A pwrite to the image
   of a block carrying a tag is not written but noted, and returns as if written (so unix_io's cache and
   its count of bytes written, the superblock's "Lifetime writes", are as without this library). Once
   ext2fs_close2 has flushed and closed everything mkfs writes, every noted run is copied from its source
   (opened again by path, and refused if its device, inode, size or times changed since it was read) into
   the image at the blocks libext2fs chose. The image file is new and sparse (builder/fs/ext.py truncates
   it before mkfs), so the rest of a file's last block reads as zeros, as libext2fs writes it: the
   image's bytes are the same. A source that shrank under the mapping (SIGBUS) fails mkfs with a line
   naming it.

   Configured by MDI_DATA_IMAGE (the image as mkfs opens it), MDI_DATA_OFFSET (the filesystem's byte offset
   in it: mkfs' -E offset) and MDI_DATA_REPORT (a file the counts are written to at exit). Without them,
   on filesystems with inline data, or elsewhere than x86-64 (struct_ext2_filsys is read as laid out
   there), every call goes to e2fsprogs as without this library. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/fs.h>

#if defined(__x86_64__)

typedef long errcode_t;
typedef void *filsys;
typedef void *e2file;

#define ET_MAGIC_EXT2FS_FILSYS (2133571328L + 1) /* lib/ext2fs/ext2_err.et.in */
#define FS_SUPER_OFF 32                        /* struct struct_ext2_filsys: super, then blocksize */
#define FS_BLOCKSIZE_OFF 40
#define SB_FEATURE_INCOMPAT 0x60
#define INCOMPAT_INLINE_DATA 0x8000
#define FILE_WRITE 1 /* EXT2_FILE_WRITE */

#define TAG_LEN 16
static const uint64_t TAG_MAGIC = 0x6d64692d64617461ULL;

typedef errcode_t file_open_fn(filsys, uint32_t, int, e2file *);
typedef errcode_t file_close_fn(e2file);
typedef errcode_t close2_fn(filsys, int);
typedef ssize_t pread_fn(int, void *, size_t, off_t);
typedef ssize_t pwrite_fn(int, const void *, size_t, off_t);

static struct {
    file_open_fn *file_open;
    file_close_fn *file_close;
    close2_fn *close2;
    pread_fn *pread;
    pwrite_fn *pwrite;
} lib;

/* A source file whose data is copied: where to find it again, and what it was when read. */
struct source {
    char *path;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
    size_t last_run; /* index + 1 of its newest run, 0 for none */
};

struct run {
    uint32_t source;
    uint64_t src, dst, len;
};

/* How data of one source device can be moved: the ways refused, with their errno. */
struct device {
    dev_t dev;
    int clone_errno, range_errno, sendfile_errno;
};

static struct {
    int ready, img;
    dev_t img_dev;
    ino_t img_ino;
    uint64_t offset;
    uint32_t bs;
    const char *report;
    struct source *sources;
    size_t nsources, sources_cap;
    struct run *runs;
    size_t nruns, runs_cap;
    struct device devices[16];
    unsigned ndevices;
    unsigned long long cloned, ranged, sent, copied, by_mkfs;
} g = {.img = -1};

/* The file mkfs has open for writing, and its source once read (-1 before; -2: it goes mkfs' own way). */
static struct {
    e2file file;
    int active, src;
    uint32_t source;
    const unsigned char *map;
    size_t map_len;
} cur = {.src = -1};

static sigjmp_buf bus_jump;
static volatile sig_atomic_t scanning;

static void on_bus(int sig, siginfo_t *info, void *ctx) {
    (void)info;
    (void)ctx;
    if (scanning)
        siglongjmp(bus_jump, 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void resolve(void) {
    if (lib.pread)
        return;
    lib.file_open = (file_open_fn *)dlsym(RTLD_NEXT, "ext2fs_file_open");
    lib.file_close = (file_close_fn *)dlsym(RTLD_NEXT, "ext2fs_file_close");
    lib.close2 = (close2_fn *)dlsym(RTLD_NEXT, "ext2fs_close2");
    lib.pwrite = (pwrite_fn *)dlsym(RTLD_NEXT, "pwrite64");
    lib.pread = (pread_fn *)dlsym(RTLD_NEXT, "pread64");
}

/* The kernel's fstat, not a preloaded one's (the stat shim rewrites owners and times for mkfs). */
static int raw_fstat(int fd, struct stat *st) {
    return (int)syscall(SYS_fstat, fd, st);
}

__attribute__((constructor)) static void setup(void) {
    resolve();
    const char *image = getenv("MDI_DATA_IMAGE"), *offset = getenv("MDI_DATA_OFFSET");
    if (!image || !offset || !*offset || !lib.file_open || !lib.file_close || !lib.close2 || !lib.pwrite ||
        !lib.pread)
        return;
    char *end;
    g.offset = strtoull(offset, &end, 10);
    struct stat st;
    g.img = open(image, O_RDWR | O_CLOEXEC);
    if (*end || g.img < 0 || raw_fstat(g.img, &st) != 0 || !S_ISREG(st.st_mode)) {
        if (g.img >= 0)
            close(g.img);
        g.img = -1;
        return;
    }
    g.img_dev = st.st_dev;
    g.img_ino = st.st_ino;
    g.report = getenv("MDI_DATA_REPORT");
    struct sigaction sa = {.sa_sigaction = on_bus, .sa_flags = SA_SIGINFO};
    sigemptyset(&sa.sa_mask);
    g.ready = sigaction(SIGBUS, &sa, NULL) == 0;
}

__attribute__((destructor)) static void report(void) {
    if (!g.ready || !g.report)
        return;
    FILE *f = fopen(g.report, "we");
    if (!f)
        return;
    int ce = 0, re = 0, se = 0;
    for (unsigned i = 0; i < g.ndevices; i++) {
        ce = ce ? ce : g.devices[i].clone_errno;
        re = re ? re : g.devices[i].range_errno;
        se = se ? se : g.devices[i].sendfile_errno;
    }
    fprintf(f, "files %zu\ncloned %llu\ncopy_file_range %llu\nsendfile %llu\nread_write %llu\nmkfs %llu\n"
               "clone_errno %d\ncopy_file_range_errno %d\nsendfile_errno %d\n",
            g.nsources, g.cloned, g.ranged, g.sent, g.copied, g.by_mkfs, ce, re, se);
    fclose(f);
}

static void end_file(void) {
    if (cur.map)
        munmap((void *)cur.map, cur.map_len);
    cur.map = NULL;
    cur.active = 0;
    cur.src = -1;
}

errcode_t ext2fs_file_open(filsys fs, uint32_t ino, int flags, e2file *ret) {
    resolve();
    errcode_t err = lib.file_open(fs, ino, flags, ret);
    if (err || !g.ready || cur.active || !(flags & FILE_WRITE))
        return err;
    long magic;
    const char *super;
    uint32_t bs, incompat;
    memcpy(&magic, fs, sizeof magic);
    memcpy(&super, (const char *)fs + FS_SUPER_OFF, sizeof super);
    memcpy(&bs, (const char *)fs + FS_BLOCKSIZE_OFF, sizeof bs);
    if (magic != ET_MAGIC_EXT2FS_FILSYS || !super || bs < 1024 || (bs & (bs - 1)) || (g.bs && bs != g.bs))
        return err;
    memcpy(&incompat, super + SB_FEATURE_INCOMPAT, sizeof incompat);
    if (incompat & INCOMPAT_INLINE_DATA) /* data would go into the inode itself, tags and all */
        return err;
    g.bs = bs;
    cur.file = *ret;
    cur.active = 1;
    cur.src = -1;
    return err;
}

errcode_t ext2fs_file_close(e2file file) {
    resolve();
    if (cur.active && file == cur.file)
        end_file(); /* its blocks are noted when unix_io writes them, which may be later */
    return lib.file_close(file);
}

/* Whether fd is the source of the file being written (a regular file other than the image): if so, it
   is mapped and given a source entry, unless it cannot be, and then mkfs reads it itself. */
static int adopt(int fd) {
    struct stat st;
    if (raw_fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (st.st_dev == g.img_dev && st.st_ino == g.img_ino))
        return 0;
    cur.src = -2;
    if (st.st_size <= 0 || g.nsources >= UINT32_MAX)
        return 1;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0 || path[0] != '/')
        return 1;
    path[n] = 0;
    if (g.nsources == g.sources_cap) {
        size_t cap = g.sources_cap ? g.sources_cap * 2 : 256;
        struct source *s = realloc(g.sources, cap * sizeof *s);
        if (!s)
            return 1;
        g.sources = s;
        g.sources_cap = cap;
    }
    char *copy = strdup(path);
    void *map = copy ? mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0) : MAP_FAILED;
    if (map == MAP_FAILED) {
        free(copy);
        return 1;
    }
    g.sources[g.nsources] = (struct source){copy, st.st_dev, st.st_ino, st.st_size, st.st_mtim, st.st_ctim, 0};
    cur.source = (uint32_t)g.nsources++;
    cur.map = map;
    cur.map_len = (size_t)st.st_size;
    cur.src = fd;
    return 1;
}

static int all_zero(const unsigned char *p, size_t n) {
    uint64_t w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        if (w)
            return 0;
    }
    for (; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* A read of the source as mkfs is shown it: zeros, a short tail's own bytes, or each block's tag; -2 for a
   read not at a block boundary, which is made for real. */
static ssize_t tagged_read(unsigned char *buf, size_t n, off_t off) {
    if (off < 0 || (uint64_t)off % g.bs)
        return -2;
    if ((uint64_t)off >= cur.map_len)
        return 0;
    size_t got = cur.map_len - (size_t)off < n ? cur.map_len - (size_t)off : n;
    scanning = 1;
    if (sigsetjmp(bus_jump, 1)) {
        scanning = 0;
        fprintf(stderr, "mkfs.ext4 -d (builder/sandbox/e2fsdata.c): %s: the file shrank while it was read\n",
                g.sources[cur.source].path);
        errno = EIO;
        return -1;
    }
    for (size_t pos = 0; pos < got; pos += g.bs) {
        size_t len = got - pos < g.bs ? got - pos : g.bs;
        const unsigned char *src = cur.map + off + pos;
        if (all_zero(src, len)) {
            memset(buf + pos, 0, len);
        } else if (len < TAG_LEN) {
            memcpy(buf + pos, src, len);
            g.by_mkfs += len;
        } else {
            uint32_t index = (uint32_t)(((uint64_t)off + pos) / g.bs);
            memcpy(buf + pos, &TAG_MAGIC, 8);
            memcpy(buf + pos + 8, &cur.source, 4);
            memcpy(buf + pos + 12, &index, 4);
        }
    }
    scanning = 0;
    return (ssize_t)got;
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off) {
    resolve();
    if (cur.active && cur.src == -1)
        adopt(fd);
    if (cur.active && cur.src >= 0 && fd == cur.src) {
        ssize_t got = tagged_read(buf, n, off);
        if (got != -2)
            return got;
    }
    return lib.pread(fd, buf, n, off);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off) __attribute__((alias("pread64")));

/* The run a tagged block at image byte dst starts or extends; 0 if data is no tag of ours, -1 on ENOMEM. */
static int note_block(const unsigned char *data, uint64_t dst) {
    uint64_t magic;
    uint32_t source, index;
    memcpy(&magic, data, 8);
    memcpy(&source, data + 8, 4);
    memcpy(&index, data + 12, 4);
    if (magic != TAG_MAGIC || source >= g.nsources)
        return 0;
    struct source *s = &g.sources[source];
    uint64_t src = (uint64_t)index * g.bs;
    if (src >= (uint64_t)s->size)
        return 0;
    uint64_t len = (uint64_t)s->size - src < g.bs ? (uint64_t)s->size - src : g.bs;
    struct run *last = s->last_run ? &g.runs[s->last_run - 1] : NULL;
    if (last && last->src + last->len == src && last->dst + last->len == dst && last->len % g.bs == 0) {
        last->len += len;
        return 1;
    }
    if (g.nruns == g.runs_cap) {
        size_t cap = g.runs_cap ? g.runs_cap * 2 : 1024;
        struct run *runs = realloc(g.runs, cap * sizeof *runs);
        if (!runs)
            return -1;
        g.runs = runs;
        g.runs_cap = cap;
    }
    g.runs[g.nruns++] = (struct run){source, src, dst, len};
    s->last_run = g.nruns;
    return 1;
}

/* unix_io's writes to the image: blocks carrying a tag are noted instead of written. */
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    resolve();
    if (!g.nsources || !g.bs || off < 0 || (uint64_t)off < g.offset || ((uint64_t)off - g.offset) % g.bs ||
        n % g.bs)
        return lib.pwrite(fd, buf, n, off);
    const unsigned char *p = buf;
    size_t first = 0;
    while (first < n && memcmp(p + first, &TAG_MAGIC, 8))
        first += g.bs;
    struct stat st;
    if (first == n || raw_fstat(fd, &st) != 0 || st.st_dev != g.img_dev || st.st_ino != g.img_ino)
        return lib.pwrite(fd, buf, n, off);
    size_t plain = 0; /* bytes from p not yet written: blocks without a tag */
    for (size_t pos = first; pos < n; pos += g.bs) {
        int noted = note_block(p + pos, (uint64_t)off + pos);
        if (noted < 0) {
            errno = ENOMEM;
            return -1;
        }
        if (!noted)
            continue;
        for (size_t done = 0; done < pos - plain;) {
            ssize_t w = lib.pwrite(fd, p + plain + done, pos - plain - done, off + (off_t)(plain + done));
            if (w <= 0)
                return w < 0 ? -1 : (ssize_t)(plain + done);
            done += (size_t)w;
        }
        plain = pos + g.bs;
    }
    for (size_t done = 0; done < n - plain;) {
        ssize_t w = lib.pwrite(fd, p + plain + done, n - plain - done, off + (off_t)(plain + done));
        if (w <= 0)
            return w < 0 ? -1 : (ssize_t)(plain + done);
        done += (size_t)w;
    }
    return (ssize_t)n;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) __attribute__((alias("pwrite64")));

static struct device *device_of(dev_t dev) {
    for (unsigned i = 0; i < g.ndevices; i++)
        if (g.devices[i].dev == dev)
            return &g.devices[i];
    if (g.ndevices < sizeof g.devices / sizeof g.devices[0]) {
        g.devices[g.ndevices] = (struct device){.dev = dev};
        return &g.devices[g.ndevices++];
    }
    return NULL;
}

/* One run from the source into the image: shared blocks, else an in-kernel copy, else through a buffer.
   A last block the file fills only in part is copied, not shared: the kernel refuses to clone a source's
   end of file into the middle of another file (generic_remap_check_len, fs/remap_range.c). */
static int copy_run(struct device *dev, int src, const struct run *r) {
    uint64_t whole = r->len - r->len % g.bs, done = 0;
    if (dev && !dev->clone_errno && whole) {
        struct file_clone_range fcr = {
            .src_fd = src, .src_offset = r->src, .src_length = whole, .dest_offset = r->dst};
        if (ioctl(g.img, FICLONERANGE, &fcr) == 0) {
            g.cloned += whole;
            done = whole;
        } else if (errno != EINVAL) { /* another filesystem, no reflinks, ...; EINVAL: this range's alignment */
            dev->clone_errno = errno;
        }
    }
    off_t in = (off_t)(r->src + done), out = (off_t)(r->dst + done);
    uint64_t left = r->len - done;
    while (left && dev && !dev->range_errno) {
        ssize_t n = copy_file_range(src, &in, g.img, &out, left, 0);
        if (n > 0) {
            left -= (uint64_t)n;
            g.ranged += (uint64_t)n;
        } else if (n == 0) {
            return ENODATA; /* the source ended early */
        } else if (errno == EXDEV || errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
            dev->range_errno = errno;
        } else if (errno != EINTR) {
            return errno;
        }
    }
    while (left && dev && !dev->sendfile_errno) {
        if (lseek(g.img, out, SEEK_SET) != out)
            return errno;
        ssize_t n = sendfile(g.img, src, &in, left);
        if (n > 0) {
            left -= (uint64_t)n;
            out += n;
            g.sent += (uint64_t)n;
        } else if (n == 0) {
            return ENODATA;
        } else if (errno == EINVAL || errno == ENOSYS) {
            dev->sendfile_errno = errno;
        } else if (errno != EINTR) {
            return errno;
        }
    }
    static unsigned char buf[1 << 20];
    while (left) {
        ssize_t n = lib.pread(src, buf, left < sizeof buf ? left : sizeof buf, in);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return n == 0 ? ENODATA : errno;
        }
        for (ssize_t done = 0; done < n;) {
            ssize_t w = lib.pwrite(g.img, buf + done, (size_t)(n - done), out + done);
            if (w < 0 && errno != EINTR)
                return errno;
            done += w > 0 ? w : 0;
        }
        in += n;
        out += n;
        left -= (uint64_t)n;
        g.copied += (uint64_t)n;
    }
    return 0;
}

static int by_source(const void *a, const void *b) {
    const struct run *x = a, *y = b;
    if (x->source != y->source)
        return x->source < y->source ? -1 : 1;
    return x->src < y->src ? -1 : x->src > y->src;
}

/* Every noted run copied, a source at a time, each checked to be the file that was read. */
static errcode_t copy_all(void) {
    qsort(g.runs, g.nruns, sizeof *g.runs, by_source);
    for (size_t i = 0; i < g.nruns;) {
        struct source *s = &g.sources[g.runs[i].source];
        int fd = open(s->path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
        struct stat st;
        int err = fd < 0 ? errno : raw_fstat(fd, &st) != 0 ? errno : 0;
        if (!err && (st.st_dev != s->dev || st.st_ino != s->ino || st.st_size != s->size ||
                     st.st_mtim.tv_sec != s->mtime.tv_sec || st.st_mtim.tv_nsec != s->mtime.tv_nsec ||
                     st.st_ctim.tv_sec != s->ctime.tv_sec || st.st_ctim.tv_nsec != s->ctime.tv_nsec))
            err = ESTALE;
        struct device *dev = err ? NULL : device_of(st.st_dev);
        for (; i < g.nruns && &g.sources[g.runs[i].source] == s; i++)
            if (!err)
                err = copy_run(dev, fd, &g.runs[i]);
        if (fd >= 0)
            close(fd);
        if (err) {
            fprintf(stderr, "mkfs.ext4 -d (builder/sandbox/e2fsdata.c): %s: %s\n", s->path,
                    err == ESTALE || err == ENODATA ? "the file changed while the image was being made"
                                                    : strerror(err));
            return err;
        }
    }
    return 0;
}

errcode_t ext2fs_close2(filsys fs, int flags) {
    resolve();
    errcode_t err = lib.close2(fs, flags); /* every block mkfs writes is in the image now */
    if (!err && g.ready && g.nruns) {
        err = copy_all();
        g.nruns = 0;
    }
    return err;
}

#endif
