/* LD_PRELOAD library for mkfs.ext4 -d (builder/sandbox/e2fsdata.py): file data goes from each source file
   into the image without passing through user space (FICLONERANGE, else O_DIRECT writes from a mapping of
   the source, else copy_file_range, else sendfile), never through mkfs' buffers; mkfs still allocates every
   block and writes every inode, extent, directory and bitmap.

   e2fsprogs 1.47.0's copy_file (misc/create_inode.c) opens the new inode with ext2fs_file_open, reads the
   source in 64 KiB chunks with pread64 (over the data ranges SEEK_DATA/SEEK_HOLE report), leaves a hole
   for every all-zero block (memcmp against a zero block) and hands each other block to ext2fs_file_write;
   libext2fs (lib/ext2fs/fileio.c) allocates it, zeroing it first (ext2fs_alloc_block3, alloc.c), and
   writes it with io_channel_write_blk64, one block a call; unix_io (unix_io.c) keeps both writes in its
   write cache and puts the block into the image with pwrite. mke2fs and libext2fs call all of these
   through the PLT, so the definitions here take those calls. While a file is open for writing, a pread64
   of its source gives, for each block: zeros where the source block is zero (looked at through a
   read-only mapping, so the holes are the ones mkfs makes without this library), the source's own bytes
   where only a tail of under TAG_LEN bytes is left, and else a tag naming the file and block. The
   io_channel_write_blk64 of a tagged block notes the block (a run of the file, and a bit of `placed`);
   once ext2fs_file_close has written the last one, the runs are copied from the source (a duplicate of
   mkfs' descriptor, which create_inode closes after copy_file) into the image at the blocks libext2fs
   chose, on a thread of the library's own beside mkfs (see `struct job`), and the source is checked to
   have kept its size and times since it was first read. Every pwrite to the image of a
   placed block (the tag, or the zeros written at allocation) is left out and returns as if written, so
   unix_io's cache and its count of bytes written (the superblock's "Lifetime writes") are as without
   this library, and nothing lands on the data after it is copied. The image file is new and sparse
   (builder/fs/ext.py truncates it before mkfs), so the rest of a file's last block reads as zeros, as
   libext2fs writes it: the image's bytes are the same. A source that shrank under the mapping (SIGBUS)
   or changed fails mkfs with a line naming it.

   Configured by MDI_DATA_IMAGE (the image as mkfs opens it), MDI_DATA_OFFSET (the filesystem's byte offset
   in it: mkfs' -E offset), MDI_DATA_REPORT (a file the counts are written to at exit) and MDI_DATA_MIN_SIZE
   (sources smaller than this many bytes go mkfs' way, which costs less for them than the library's
   per-file work: builder/sandbox/e2fsdata.py sets 64 KiB). Without them,
   on filesystems with inline data, or elsewhere than x86-64 (struct_ext2_filsys is read as laid out
   there), every call goes to e2fsprogs as without this library. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
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
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <stdarg.h>

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
#define WINDOW ((size_t)8 << 20) /* the source mapped 8 MiB at a time to look for zero blocks */

static const uint64_t TAG_MAGIC = 0x6d64692d64617461ULL;

typedef errcode_t file_open_fn(filsys, uint32_t, int, e2file *);
typedef errcode_t file_close_fn(e2file);
typedef errcode_t close2_fn(filsys, int);
typedef errcode_t write_blk_fn(void *, unsigned long long, int, const void *);
typedef ssize_t pread_fn(int, void *, size_t, off_t);
typedef ssize_t pwrite_fn(int, const void *, size_t, off_t);
typedef int open_fn(const char *, int, ...);
typedef int open2_fn(const char *, int);

static struct {
    file_open_fn *file_open;
    file_close_fn *file_close;
    close2_fn *close2;
    write_blk_fn *write_blk;
    pread_fn *pread;
    pwrite_fn *pwrite;
    open_fn *open, *open64;
    open2_fn *open_2, *open64_2; /* _FORTIFY_SOURCE's open without a mode (libext2fs' unix_io calls these) */
} lib;

struct run {
    uint64_t src, dst, len;
};

/* How data of one source device can be moved: the ways refused, with their errno. */
struct device {
    dev_t dev;
    int clone_errno, range_errno, sendfile_errno;
};

#define DIRECT_CHUNK ((size_t)1 << 20) /* bytes of a source mapped and written past the page cache at a time */
#define DIRECT_ALIGN 4096

/* Why data was not written directly (the report's direct_skip; builder/sandbox/e2fsdata.py words them). */
enum skip {
    SKIP_NONE,
    SKIP_MEMORY,     /* the image is on tmpfs or ramfs */
    SKIP_FILESYSTEM, /* the image's filesystem is none of ext4, XFS, btrfs */
    SKIP_REFUSED,    /* opening the image O_DIRECT, or the first direct write, was refused */
    SKIP_PAGES,      /* the filesystem's blocks are not whole 4 KiB pages of the image */
    SKIP_UNMAPPED,   /* a source could not be mapped */
    SKIP_UNADVISED,  /* mkfs was not seen opening the image for writing, so its readahead is not off */
};

static struct {
    int ready, img;
    int direct;         /* the image opened O_DIRECT, or -1 */
    int direct_off;     /* an enum skip that turned direct writes off for every run, or SKIP_NONE */
    int direct_skip;    /* the first enum skip any run was not written directly for */
    int advised;        /* mkfs' descriptors of the image opened for writing with readahead off (see opened) */
    dev_t img_dev;
    ino_t img_ino;
    const char *img_base; /* the image's file name: only a file opened by that name is looked at as the image */
    uint64_t offset;
    uint32_t bs;
    const char *report;
    uint64_t *placed; /* a bit per filesystem block: its data comes from a source, not from mkfs */
    size_t placed_words;
    struct device devices[16];
    unsigned ndevices;
    off_t min_size; /* MDI_DATA_MIN_SIZE: smaller sources go mkfs' way */
    unsigned long files, small_files;
    unsigned long long small_bytes, cloned, direct_bytes, ranged, sent, copied, by_mkfs;
} g = {.img = -1, .direct = -1};

/* The file mkfs has open for writing, its source once read (-1 before; -2: it goes mkfs' own way), and
   the runs of its blocks noted so far. */
static struct {
    e2file file;
    int active, src;
    uint32_t gen;
    struct stat st;
    size_t size;
    const unsigned char *map; /* a window of the source: map_len bytes from map_off */
    size_t map_off, map_len;
    struct run *runs;
    size_t nruns, cap;
} cur = {.src = -1};

static void add(unsigned long long *counter, uint64_t n) {
    __atomic_fetch_add(counter, (unsigned long long)n, __ATOMIC_RELAXED);
}

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
    if (__atomic_load_n(&lib.pread, __ATOMIC_ACQUIRE))
        return;
    lib.file_open = (file_open_fn *)dlsym(RTLD_NEXT, "ext2fs_file_open");
    lib.file_close = (file_close_fn *)dlsym(RTLD_NEXT, "ext2fs_file_close");
    lib.write_blk = (write_blk_fn *)dlsym(RTLD_NEXT, "io_channel_write_blk64");
    lib.close2 = (close2_fn *)dlsym(RTLD_NEXT, "ext2fs_close2");
    lib.pwrite = (pwrite_fn *)dlsym(RTLD_NEXT, "pwrite64");
    lib.open = (open_fn *)dlsym(RTLD_NEXT, "open");
    lib.open64 = (open_fn *)dlsym(RTLD_NEXT, "open64");
    lib.open_2 = (open2_fn *)dlsym(RTLD_NEXT, "__open_2");
    lib.open64_2 = (open2_fn *)dlsym(RTLD_NEXT, "__open64_2");
    __atomic_store_n(&lib.pread, (pread_fn *)dlsym(RTLD_NEXT, "pread64"), __ATOMIC_RELEASE); /* the one checked */
}

/* The kernel's fstat, not a preloaded one's (the stat shim rewrites owners and times for mkfs). */
static int raw_fstat(int fd, struct stat *st) {
    return (int)syscall(SYS_fstat, fd, st);
}

__attribute__((constructor)) static void setup(void) {
    resolve();
    const char *image = getenv("MDI_DATA_IMAGE"), *offset = getenv("MDI_DATA_OFFSET");
    if (!image || !offset || !*offset || !lib.file_open || !lib.file_close || !lib.close2 || !lib.write_blk ||
        !lib.pwrite || !lib.pread || !lib.open || !lib.open64 || !lib.open_2 || !lib.open64_2)
        return;
    char *end;
    g.offset = strtoull(offset, &end, 10);
    struct stat st;
    g.img = lib.open(image, O_RDWR | O_CLOEXEC);
    if (*end || g.img < 0 || raw_fstat(g.img, &st) != 0 || !S_ISREG(st.st_mode)) {
        if (g.img >= 0)
            close(g.img);
        g.img = -1;
        return;
    }
    g.img_dev = st.st_dev;
    g.img_ino = st.st_ino;
    posix_fadvise(g.img, 0, 0, POSIX_FADV_RANDOM); /* as mkfs' own descriptors of it (see opened) */
    const char *base = strrchr(image, '/');
    g.img_base = base ? base + 1 : image;
    /* Direct writes beside mkfs' buffered ones only where that was reasoned about and measured: an image in
       memory has no page cache to spare (the copy goes in the kernel), and on NFS or FUSE each switch between
       the two ways flushes or waits. */
    struct statfs sfs;
    long type = fstatfs(g.img, &sfs) == 0 ? (long)sfs.f_type : 0;
    if (type == TMPFS_MAGIC || type == RAMFS_MAGIC)
        g.direct_off = SKIP_MEMORY;
    else if (type != EXT4_SUPER_MAGIC && type != XFS_SUPER_MAGIC && type != BTRFS_SUPER_MAGIC)
        g.direct_off = SKIP_FILESYSTEM;
    else if ((g.direct = lib.open(image, O_WRONLY | O_DIRECT | O_CLOEXEC)) < 0)
        g.direct_off = SKIP_REFUSED;
    g.report = getenv("MDI_DATA_REPORT");
    const char *min_size = getenv("MDI_DATA_MIN_SIZE");
    g.min_size = min_size ? (off_t)strtoull(min_size, NULL, 10) : 0;
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
    fprintf(f, "small_files %lu\nsmall_bytes %llu\n", g.small_files, g.small_bytes);
    fprintf(f, "files %lu\ncloned %llu\ndirect %llu\ncopy_file_range %llu\nsendfile %llu\nread_write %llu\n"
               "mkfs %llu\nclone_errno %d\ndirect_skip %d\ncopy_file_range_errno %d\nsendfile_errno %d\n",
            g.files, g.cloned, g.direct_bytes, g.ranged, g.sent, g.copied, g.by_mkfs, ce,
            g.direct_off ? g.direct_off : g.direct_skip, re, se);
    fclose(f);
}

static void end_file(void) {
    if (cur.map)
        munmap((void *)cur.map, cur.map_len);
    cur.map = NULL;
    cur.active = 0;
    cur.src = -1;
    cur.nruns = 0;
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
    cur.gen++;
    return err;
}

/* Whether fd is the source of the file being written (a regular file other than the image): if so, it
   is mapped, unless it cannot be, and then mkfs reads it itself. */
static int adopt(int fd) {
    struct stat st;
    if (raw_fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (st.st_dev == g.img_dev && st.st_ino == g.img_ino))
        return 0;
    cur.src = -2;
    if (st.st_size <= 0)
        return 1;
    if (st.st_size < g.min_size) { /* a clone or copy here saves less than its per-file work costs */
        g.small_files++;
        g.small_bytes += (unsigned long long)st.st_size;
        return 1;
    }
    cur.st = st;
    cur.size = (size_t)st.st_size;
    cur.src = fd;
    g.files++;
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

static void name_source(int fd, char *out, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, size - 1);
    out[n > 0 ? n : 0] = 0;
}

/* A read of the source as mkfs is shown it: zeros, a short tail's own bytes, or each block's tag; -2 for a
   read not at a block boundary, which is made for real. */
static ssize_t tagged_read(unsigned char *buf, size_t n, off_t off) {
    if (off < 0 || (uint64_t)off % g.bs || (uint64_t)off % (uint64_t)sysconf(_SC_PAGESIZE))
        return -2;
    if ((uint64_t)off >= cur.size)
        return 0;
    size_t got = cur.size - (size_t)off < n ? cur.size - (size_t)off : n;
    if (!cur.map || (size_t)off < cur.map_off || (size_t)off + got > cur.map_off + cur.map_len) {
        /* The next WINDOW of the file mapped in place of the last: file pages mapped stay few (RSS). */
        if (cur.map)
            munmap((void *)cur.map, cur.map_len);
        size_t len = got > WINDOW ? got : WINDOW;
        len = cur.size - (size_t)off < len ? cur.size - (size_t)off : len;
        void *map = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_POPULATE, cur.src, off);
        cur.map = map == MAP_FAILED ? NULL : map;
        if (!cur.map)
            return -2;
        cur.map_off = (size_t)off;
        cur.map_len = len;
    }
    scanning = 1;
    if (sigsetjmp(bus_jump, 1)) {
        scanning = 0;
        char path[4096];
        name_source(cur.src, path, sizeof path);
        fprintf(stderr, "mkfs.ext4 -d (builder/sandbox/e2fsdata.c): %s: the file changed while the image was "
                        "being made (it shrank)\n", path);
        errno = EIO;
        return -1;
    }
    for (size_t pos = 0; pos < got; pos += g.bs) {
        size_t len = got - pos < g.bs ? got - pos : g.bs;
        const unsigned char *src = cur.map + ((size_t)off - cur.map_off) + pos;
        if (all_zero(src, len)) {
            memset(buf + pos, 0, len);
        } else if (len < TAG_LEN) {
            memcpy(buf + pos, src, len);
            g.by_mkfs += len;
        } else {
            uint32_t index = (uint32_t)(((uint64_t)off + pos) / g.bs);
            memcpy(buf + pos, &TAG_MAGIC, 8);
            memcpy(buf + pos + 8, &cur.gen, 4);
            memcpy(buf + pos + 12, &index, 4);
        }
    }
    scanning = 0;
    return (ssize_t)got;
}

/* mkfs' own descriptors of the image read without readahead (POSIX_FADV_RANDOM): a read then brings in the
   blocks asked for in pages of their own, never a large folio reaching into blocks a direct write fills,
   which mkfs could dirty beside the write and so keep from being dropped after it (the kernel then reports
   stale page cache and fails the image's fsync). */
static int opened(const char *path, int flags, int fd) {
    struct stat st;
    const char *base = strrchr(path, '/');
    if (fd >= 0 && g.direct >= 0 && !strcmp(base ? base + 1 : path, g.img_base) && raw_fstat(fd, &st) == 0 &&
        st.st_dev == g.img_dev && st.st_ino == g.img_ino && posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM) == 0 &&
        (flags & O_ACCMODE) != O_RDONLY)
        __atomic_store_n(&g.advised, 1, __ATOMIC_RELEASE);
    return fd;
}

/* open's mode argument is there only with O_CREAT or O_TMPFILE (which includes O_DIRECTORY's bit). */
static int open_with(open_fn *real, const char *path, int flags, va_list ap) {
    mode_t mode = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
    return opened(path, flags, real(path, flags, mode));
}

/* open and open64, each taking its call to the next definition of the same name. */
#define OPEN_WRAPPER(name)                                                                                   \
    int name(const char *path, int flags, ...) {                                                             \
        resolve();                                                                                           \
        va_list ap;                                                                                          \
        va_start(ap, flags);                                                                                 \
        int fd = open_with(lib.name, path, flags, ap);                                                       \
        va_end(ap);                                                                                          \
        return fd;                                                                                           \
    }
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)

int __open_2(const char *path, int flags) {
    resolve();
    return opened(path, flags, lib.open_2(path, flags));
}

int __open64_2(const char *path, int flags) {
    resolve();
    return opened(path, flags, lib.open64_2(path, flags));
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

static int is_placed(uint64_t block) {
    return block / 64 < g.placed_words && (g.placed[block / 64] >> (block % 64) & 1);
}

static int place(uint64_t block) {
    if (block / 64 >= g.placed_words) {
        size_t words = g.placed_words ? g.placed_words : 1024;
        while (words <= block / 64)
            words *= 2;
        uint64_t *bits = realloc(g.placed, words * sizeof *bits);
        if (!bits)
            return -1;
        memset(bits + g.placed_words, 0, (words - g.placed_words) * sizeof *bits);
        g.placed = bits;
        g.placed_words = words;
    }
    g.placed[block / 64] |= 1ull << (block % 64);
    return 0;
}

/* The run a tagged block of the current file starts or extends: 1; 0 if data is no tag of it; -1: ENOMEM. */
static int note_block(unsigned long long block, const unsigned char *data) {
    uint64_t magic;
    uint32_t gen, index;
    memcpy(&magic, data, 8);
    memcpy(&gen, data + 8, 4);
    memcpy(&index, data + 12, 4);
    uint64_t src = (uint64_t)index * g.bs;
    if (magic != TAG_MAGIC || gen != cur.gen || src >= cur.size)
        return 0;
    uint64_t len = cur.size - src < g.bs ? cur.size - src : g.bs;
    uint64_t dst = g.offset + (uint64_t)block * g.bs;
    if (place(block) != 0)
        return -1;
    struct run *last = cur.nruns ? &cur.runs[cur.nruns - 1] : NULL;
    if (last && last->src + last->len == src && last->dst + last->len == dst && last->len % g.bs == 0) {
        last->len += len;
        return 1;
    }
    if (cur.nruns == cur.cap) {
        size_t cap = cur.cap ? cur.cap * 2 : 64;
        struct run *runs = realloc(cur.runs, cap * sizeof *runs);
        if (!runs)
            return -1;
        cur.runs = runs;
        cur.cap = cap;
    }
    cur.runs[cur.nruns++] = (struct run){src, dst, len};
    return 1;
}

errcode_t io_channel_write_blk64(void *ch, unsigned long long block, int count, const void *data) {
    resolve();
    if (cur.active && cur.src >= 0 && count == 1 && data && note_block(block, data) < 0)
        return ENOMEM;
    return lib.write_blk(ch, block, count, data); /* into unix_io's cache; its pwrite is left out below */
}

/* unix_io's writes to the image: placed blocks are left out. A tagged block that is not placed would
   mean a block this library did not see written: mkfs fails rather than write a tag into the image. */
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    resolve();
    if (!g.placed_words || off < 0 || (uint64_t)off < g.offset || ((uint64_t)off - g.offset) % g.bs || n % g.bs)
        return lib.pwrite(fd, buf, n, off);
    const unsigned char *p = buf;
    uint64_t first_block = ((uint64_t)off - g.offset) / g.bs;
    size_t first = 0;
    while (first < n && !is_placed(first_block + first / g.bs) && memcmp(p + first, &TAG_MAGIC, 8))
        first += g.bs;
    struct stat st;
    if (first == n || raw_fstat(fd, &st) != 0 || st.st_dev != g.img_dev || st.st_ino != g.img_ino)
        return lib.pwrite(fd, buf, n, off);
    size_t plain = 0; /* bytes from p not yet written: blocks mkfs' own */
    for (size_t pos = first; pos <= n; pos += g.bs) {
        int skip = pos < n && is_placed(first_block + pos / g.bs);
        if (pos < n && !skip && !memcmp(p + pos, &TAG_MAGIC, 8)) {
            fprintf(stderr, "mkfs.ext4 -d (builder/sandbox/e2fsdata.c): block %llu was about to be written with "
                            "a tag it was not noted for\n", (unsigned long long)(first_block + pos / g.bs));
            errno = EIO;
            return -1;
        }
        if (pos < n && !skip)
            continue;
        for (size_t done = 0; done < pos - plain;) {
            ssize_t w = lib.pwrite(fd, p + plain + done, pos - plain - done, off + (off_t)(plain + done));
            if (w <= 0)
                return w < 0 ? -1 : (ssize_t)(plain + done);
            done += (size_t)w;
        }
        plain = pos + g.bs;
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

/* Writes to the image past its page cache (O_DIRECT), straight from the source's page cache: each write's
   buffer is a read-only mapping of DIRECT_CHUNK bytes of the source, so the disk is given the store's own
   pages and the data is copied nowhere, in the kernel or out of it. The image's pages are neither
   allocated, filled nor written back later: on a busy page cache those cost more than a copy. Writes are
   submitted with Linux AIO, so that the image's inode lock, which a synchronous direct write keeps until the
   disk has the data, is free for mkfs' own writes meanwhile; DIRECT_SLOTS are in flight at most, and all
   of a file's are finished before its source is checked and closed. The first write is synchronous: an
   image whose filesystem refuses O_DIRECT is seen there, and the runs go another way. A file's last page,
   when the file ends inside it, is read into a buffer of the slot's and zeroed after the end: past a file's
   end a mapping shows what the page holds, which a writer through another mapping can have made non-zero.
   One writer per thread that copies.

   Why buffered and direct writes to one file agree here: mkfs writes only blocks that are not placed (see
   pwrite64), a buffered write makes page-cache folios no larger than itself, and mkfs' reads of the image
   make single pages (readahead off: see opened); so no folio holds both a block mkfs writes and one written
   directly, and the kernel can drop any page a direct write covers. Other writers of the image meanwhile
   (mkfs.vfat, for the ESP) stay in their partitions, which start on MiB boundaries, while a readahead
   folio is at most the device's readahead size and aligned to it. */
#define DIRECT_SLOTS 8
struct direct_writer {
    int ready;
    aio_context_t ctx; /* 0: no AIO here, every write is synchronous */
    void *buf[DIRECT_SLOTS];          /* in flight: the slot's tail page, or a mapping of len bytes */
    unsigned char *tail[DIRECT_SLOTS];
    size_t len[DIRECT_SLOTS];
    struct iocb cb[DIRECT_SLOTS];
    unsigned next, inflight;
    int proven, error;
};
static __thread struct direct_writer dw;

static void direct_release(unsigned slot) {
    if (dw.buf[slot] && dw.buf[slot] != dw.tail[slot])
        munmap(dw.buf[slot], dw.len[slot]);
    dw.buf[slot] = NULL;
}

/* Collect at least min finished writes; a write that failed or fell short is the writer's error. */
static void direct_reap(long min) {
    struct io_event ev[DIRECT_SLOTS];
    long n = syscall(SYS_io_getevents, dw.ctx, min, (long)DIRECT_SLOTS, ev, NULL);
    if (n < 0 && errno != EINTR) { /* none can be collected: what is in flight counts as failed (and stays mapped) */
        dw.error = dw.error ? dw.error : errno;
        memset(dw.buf, 0, sizeof dw.buf);
        dw.inflight = 0;
    }
    for (long i = 0; i < n; i++) {
        unsigned slot = (unsigned)ev[i].data;
        direct_release(slot);
        dw.inflight--;
        if (ev[i].res != (long long)dw.len[slot] && !dw.error)
            dw.error = ev[i].res < 0 ? (int)-ev[i].res : EIO;
    }
}

/* Every write of this thread finished; the first failure's errno, or 0. */
static int direct_finish(void) {
    while (dw.inflight)
        direct_reap(1);
    return dw.error;
}

/* The write of slot's buffer (len bytes) at out: synchronous until one has succeeded, and whenever the
   kernel has no room for another with none in flight; else submitted. */
static int direct_write(unsigned slot, size_t len, off_t out) {
    struct iocb *cb = &dw.cb[slot];
    *cb = (struct iocb){.aio_data = slot, .aio_lio_opcode = IOCB_CMD_PWRITE, .aio_fildes = (uint32_t)g.direct,
                        .aio_buf = (uint64_t)(uintptr_t)dw.buf[slot], .aio_nbytes = len, .aio_offset = out};
    dw.len[slot] = len;
    while (dw.proven && dw.ctx) {
        if (syscall(SYS_io_submit, dw.ctx, 1L, &cb) == 1) {
            dw.inflight++;
            return 0;
        }
        if (errno != EINTR && errno != EAGAIN) {
            direct_release(slot);
            return errno;
        }
        if (errno == EAGAIN && !dw.inflight)
            break;
        direct_reap(dw.inflight ? 1 : 0);
    }
    for (;;) {
        ssize_t w = lib.pwrite(g.direct, dw.buf[slot], len, out);
        if (w < 0 && errno == EINTR)
            continue;
        direct_release(slot);
        if (w != (ssize_t)len)
            return w < 0 ? errno : EIO;
        dw.proven = 1;
        return 0;
    }
}

#define DIRECT_REFUSED (-1) /* the image's first direct write was refused: no run goes this way any more */
#define DIRECT_UNMAPPED (-2) /* the source cannot be mapped: this run goes another way */

/* Part of a run from the source into the image with direct writes (above); a last page the file fills in
   part is written whole, zeros after the file's end, as libext2fs leaves the block (the caller sees to it
   that blocks are pages). Returns 0 with *in, *out and *left moved on, DIRECT_REFUSED, DIRECT_UNMAPPED, or
   an errno (ENODATA: the source ended early). */
static int direct_run(int src, off_t *in, off_t *out, uint64_t *left) {
    if (!dw.ready) {
        dw.ready = 1;
        for (int i = 0; i < DIRECT_SLOTS; i++) {
            void *page = NULL;
            dw.tail[i] = posix_memalign(&page, DIRECT_ALIGN, DIRECT_ALIGN) == 0 ? page : NULL;
        }
        if (syscall(SYS_io_setup, DIRECT_SLOTS, &dw.ctx) != 0)
            dw.ctx = 0;
    }
    while (*left) {
        unsigned slot = dw.next;
        while (dw.buf[slot] && !dw.error)
            direct_reap(1);
        if (dw.error)
            return dw.error;
        size_t n = *left < DIRECT_CHUNK ? (size_t)*left : DIRECT_CHUNK, len = n;
        if (n < DIRECT_ALIGN && n % DIRECT_ALIGN) { /* the file's last page, from the slot's own */
            if (!dw.tail[slot])
                return DIRECT_UNMAPPED;
            ssize_t got;
            while ((got = lib.pread(src, dw.tail[slot], n, *in)) < 0 && errno == EINTR)
                ;
            if (got != (ssize_t)n)
                return got < 0 ? errno : ENODATA;
            memset(dw.tail[slot] + n, 0, DIRECT_ALIGN - n);
            dw.buf[slot] = dw.tail[slot];
            len = DIRECT_ALIGN;
        } else {
            n -= n % DIRECT_ALIGN; /* whole pages; a last part page goes next, as above */
            len = n;
            void *map = mmap(NULL, len, PROT_READ, MAP_SHARED, src, *in);
            if (map == MAP_FAILED)
                return DIRECT_UNMAPPED;
            dw.buf[slot] = map;
        }
        int proven = dw.proven;
        int err = direct_write(slot, len, *out);
        if (err && !proven && (err == EINVAL || err == EOPNOTSUPP || err == ENOTSUP))
            return DIRECT_REFUSED;
        if (err)
            return err;
        dw.next = (slot + 1) % DIRECT_SLOTS;
        *in += (off_t)n;
        *out += (off_t)n;
        *left -= n;
        add(&g.direct_bytes, n);
    }
    return 0;
}

/* The first reason a run was not written directly, for the report. */
static void note_skip(int why) {
    int none = SKIP_NONE;
    __atomic_compare_exchange_n(&g.direct_skip, &none, why, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* Whether this run may go by direct writes; if not, the reason is noted for the report. */
static int direct_allowed(off_t in, off_t out) {
    if (__atomic_load_n(&g.direct_off, __ATOMIC_RELAXED))
        return 0;
    int why = g.direct < 0 ? SKIP_REFUSED
              : !__atomic_load_n(&g.advised, __ATOMIC_ACQUIRE) ? SKIP_UNADVISED
              : g.bs != DIRECT_ALIGN || in % DIRECT_ALIGN || out % DIRECT_ALIGN ? SKIP_PAGES : SKIP_NONE;
    if (why == SKIP_NONE)
        return 1;
    note_skip(why);
    return 0;
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
            add(&g.cloned, whole);
            done = whole;
        } else if (errno != EINVAL) { /* another filesystem, no reflinks, ...; EINVAL: this range's alignment */
            dev->clone_errno = errno;
        }
    }
    off_t in = (off_t)(r->src + done), out = (off_t)(r->dst + done);
    uint64_t left = r->len - done;
    if (left && direct_allowed(in, out)) { /* blocks that are pages, of the image and the source */
        int err = direct_run(src, &in, &out, &left);
        if (err > 0)
            return err;
        if (err == DIRECT_REFUSED)
            __atomic_store_n(&g.direct_off, SKIP_REFUSED, __ATOMIC_RELAXED);
        else if (err == DIRECT_UNMAPPED)
            note_skip(SKIP_UNMAPPED);
    }
    while (left && dev && !dev->range_errno) {
        ssize_t n = copy_file_range(src, &in, g.img, &out, left, 0);
        if (n > 0) {
            left -= (uint64_t)n;
            add(&g.ranged, (uint64_t)n);
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
            add(&g.sent, (uint64_t)n);
        } else if (n == 0) {
            return ENODATA;
        } else if (errno == EINVAL || errno == ENOSYS) {
            dev->sendfile_errno = errno;
        } else if (errno != EINTR) {
            return errno;
        }
    }
    unsigned char *buf = left ? malloc(1 << 20) : NULL;
    if (left && !buf)
        return ENOMEM;
    int err = 0;
    while (left && !err) {
        ssize_t n = lib.pread(src, buf, left < (1 << 20) ? left : (1 << 20), in);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            err = n == 0 ? ENODATA : errno;
            break;
        }
        for (ssize_t done = 0; done < n && !err;) {
            ssize_t w = lib.pwrite(g.img, buf + done, (size_t)(n - done), out + done);
            if (w < 0 && errno != EINTR)
                err = errno;
            done += w > 0 ? w : 0;
        }
        in += n;
        out += n;
        left -= (uint64_t)n;
        add(&g.copied, (uint64_t)n);
    }
    free(buf);
    return err;
}

/* Copying off mkfs' thread: mkfs goes on with the next file while a worker thread puts this one's data in
   (the builder starts the image's writeback beside both: builder/disk/writeback.py). The source is a dup
   of mkfs' descriptor
   (mkfs closes its own after the file). Without a thread or a descriptor, the copy is made in mkfs'
   thread as the file closes. ext2fs_close2 waits for every copy before the filesystem is closed, and the
   first failure fails mkfs: at the next file's close, or at ext2fs_close2. */
struct job {
    int fd;
    struct device *dev;
    struct stat st;
    struct run *runs;
    size_t nruns;
};

#define QUEUE 256
static struct {
    pthread_mutex_t lock;
    pthread_cond_t filled, drained;
    struct job jobs[QUEUE];
    unsigned head, count;
    int started, stopping, error;
    pthread_t thread;
} q = {.lock = PTHREAD_MUTEX_INITIALIZER, .filled = PTHREAD_COND_INITIALIZER, .drained = PTHREAD_COND_INITIALIZER};

/* A file's runs copied, then checked to be the file that was read; 0 or the errno (message printed). */
static int copy_file_data(int fd, struct device *dev, const struct stat *st, const struct run *runs, size_t nruns) {
    int failed = 0;
    for (size_t i = 0; i < nruns && !failed; i++)
        failed = copy_run(dev, fd, &runs[i]);
    int late = direct_finish(); /* the file's direct writes are done before it is checked and closed */
    failed = failed ? failed : late;
    struct stat now; /* a changed file is named as such whatever failed (EFAULT: a mapping outran a shrunk file) */
    if ((!failed || failed == EFAULT || failed == ENODATA || failed == EIO) &&
        (raw_fstat(fd, &now) != 0 || now.st_size != st->st_size ||
         now.st_mtim.tv_sec != st->st_mtim.tv_sec || now.st_mtim.tv_nsec != st->st_mtim.tv_nsec ||
         now.st_ctim.tv_sec != st->st_ctim.tv_sec || now.st_ctim.tv_nsec != st->st_ctim.tv_nsec))
        failed = ESTALE;
    if (failed) {
        char path[4096];
        name_source(fd, path, sizeof path);
        fprintf(stderr, "mkfs.ext4 -d (builder/sandbox/e2fsdata.c): %s: %s\n", path,
                failed == ESTALE || failed == ENODATA ? "the file changed while the image was being made"
                                                      : strerror(failed));
    }
    return failed;
}

static void *worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&q.lock);
    for (;;) {
        while (!q.count && !q.stopping)
            pthread_cond_wait(&q.filled, &q.lock);
        if (!q.count)
            break;
        struct job job = q.jobs[q.head];
        q.head = (q.head + 1) % QUEUE;
        q.count--;
        int skip = q.error != 0;
        pthread_cond_broadcast(&q.drained);
        pthread_mutex_unlock(&q.lock);
        int failed = skip ? 0 : copy_file_data(job.fd, job.dev, &job.st, job.runs, job.nruns);
        close(job.fd);
        free(job.runs);
        pthread_mutex_lock(&q.lock);
        if (failed && !q.error)
            q.error = failed;
        pthread_cond_broadcast(&q.drained);
    }
    pthread_mutex_unlock(&q.lock);
    return NULL;
}

/* Hand the current file's runs to the worker (1), or say it must be copied here (0). */
static int hand_over(int src, struct device *dev) {
    int fd = fcntl(src, F_DUPFD_CLOEXEC, 3);
    if (fd < 0)
        return 0;
    pthread_mutex_lock(&q.lock);
    if (!q.started) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay mkfs' thread's */
        q.started = pthread_create(&q.thread, NULL, worker, NULL) == 0 ? 1 : -1;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (q.started < 0) {
        pthread_mutex_unlock(&q.lock);
        close(fd);
        return 0;
    }
    while (q.count == QUEUE)
        pthread_cond_wait(&q.drained, &q.lock);
    q.jobs[(q.head + q.count) % QUEUE] = (struct job){fd, dev, cur.st, cur.runs, cur.nruns};
    q.count++;
    pthread_cond_signal(&q.filled);
    pthread_mutex_unlock(&q.lock);
    cur.runs = NULL; /* the worker frees them */
    cur.cap = cur.nruns = 0;
    return 1;
}

/* Every handed-over copy done; the first failure's errno, or 0. */
static int drain(void) {
    pthread_mutex_lock(&q.lock);
    int started = q.started > 0;
    q.stopping = 1;
    pthread_cond_signal(&q.filled);
    pthread_mutex_unlock(&q.lock);
    if (started)
        pthread_join(q.thread, NULL);
    q.started = 0;
    q.stopping = 0;
    return q.error;
}

static int pending_error(void) {
    pthread_mutex_lock(&q.lock);
    int err = q.error;
    pthread_mutex_unlock(&q.lock);
    return err;
}

errcode_t ext2fs_file_close(e2file file) {
    resolve();
    if (!cur.active || file != cur.file)
        return lib.file_close(file);
    errcode_t err = lib.file_close(file); /* writes the last block, noted as the others */
    int src = cur.src;
    if (!err && src >= 0 && cur.nruns) {
        struct device *dev = device_of(cur.st.st_dev);
        err = pending_error();
        if (!err && !hand_over(src, dev))
            err = copy_file_data(src, dev, &cur.st, cur.runs, cur.nruns);
    }
    end_file();
    return err;
}

errcode_t ext2fs_close2(filsys fs, int flags) {
    resolve();
    int failed = drain(); /* every copy in before mkfs' last writes and its fsync */
    errcode_t err = lib.close2(fs, flags);
    return failed ? failed : err;
}

#endif
