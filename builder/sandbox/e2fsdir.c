/* LD_PRELOAD library for mkfs.ext4 -d (builder/sandbox/e2fsdir.py): directory entries added and looked up in
   time independent of the directory's size, with the bytes libext2fs itself writes.

   e2fsprogs 1.47.0's populate_fs (misc/create_inode.c) calls, for every entry of a directory, ext2fs_namei
   (a miss), ext2fs_link and ext2fs_namei again (a hit on the entry just made); ext2fs_mkdir looks the name
   up too. libext2fs' ext2fs_lookup and ext2fs_link (lib/ext2fs/lookup.c, link.c) each scan the directory
   from its first block: quadratic in the directory's size (20000 entries in one directory take 30 times
   as long as in 100 of 200). mke2fs and libext2fs call both through the PLT (LD_DEBUG=bindings), so the
   definitions here take those calls. For each directory of two blocks or more they keep its names (a
   hash table) and each block's largest room for an entry, read once from the directory itself; a link goes
   to the first block with room, to the first entry there that has it, exactly as link_proc (link.c) places
   it (mke2fs only adds entries: in a block only the last entry has room, and no empty entry follows
   another), so the image's bytes do not change. Everything else goes to libext2fs' own functions: one-block
   directories, indexed or inline ones, casefolded or encrypted filesystems, flags it does not know, a
   block it cannot read or does not understand (the directory is then forgotten), another filesystem
   handle. ext2fs_unlink makes it forget the directory. x86-64 only (the layouts of struct_ext2_filsys and
   the on-disk structures are read as there); elsewhere it defines nothing. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)

typedef long errcode_t;
typedef uint32_t ino_t32;
typedef uint64_t blk64_t;
typedef void *filsys;

#define ET_BASE 2133571328L /* com_err table "ext2" (lib/ext2fs/ext2_err.et.in) */
#define ET_MAGIC_EXT2FS_FILSYS (ET_BASE + 1)
#define ET_DIR_NO_SPACE (ET_BASE + 38)
#define ET_FILE_NOT_FOUND (ET_BASE + 76)

#define FS_MAGIC_OFF 0  /* struct struct_ext2_filsys: errcode_t magic */
#define FS_SUPER_OFF 32 /* struct ext2_super_block *super */
#define FS_BLOCKSIZE_OFF 40

#define SB_LOG_BLOCK_SIZE 24
#define SB_FEATURE_INCOMPAT 0x60
#define SB_FEATURE_RO_COMPAT 0x64
#define INCOMPAT_FILETYPE 0x2
#define INCOMPAT_DIRDATA 0x1000
#define INCOMPAT_INLINE_DATA 0x8000
#define INCOMPAT_ENCRYPT 0x10000
#define INCOMPAT_CASEFOLD 0x20000
#define RO_COMPAT_METADATA_CSUM 0x400

#define INODE_MODE 0
#define INODE_SIZE 4
#define INODE_FLAGS 32
#define INODE_SIZE_HIGH 108
#define INDEX_FL 0x1000
#define INLINE_DATA_FL 0x10000000
#define LINK_FT_MASK 0x7
#define TAIL_SIZE 12
#define REC_LEN(n) (((n) + 8 + 3) & ~3u)
#define MAX_NAMES (1u << 22) /* beyond this many names kept, all are forgotten (memory stays bounded) */

typedef errcode_t link_fn(filsys, ino_t32, const char *, ino_t32, int);
typedef errcode_t lookup_fn(filsys, ino_t32, const char *, int, char *, ino_t32 *);
typedef errcode_t unlink_fn(filsys, ino_t32, const char *, ino_t32, int);
typedef errcode_t read_inode_fn(filsys, ino_t32, void *);
typedef errcode_t bmap2_fn(filsys, ino_t32, void *, char *, int, blk64_t, int *, blk64_t *);
typedef errcode_t dir_block_fn(filsys, blk64_t, void *, int, ino_t32);

static struct {
    link_fn *link;
    lookup_fn *lookup;
    unlink_fn *unlink;
    read_inode_fn *read_inode;
    bmap2_fn *bmap2;
    dir_block_fn *read_block, *write_block;
    int resolved;
} lib;

struct name {
    uint32_t hash, ino, off, len;
};

struct dir {
    ino_t32 ino; /* 0: free slot */
    uint32_t nblocks, first; /* blocks read; every block before `first` has room for no entry */
    uint16_t *room;          /* per block: the largest entry it can take (REC_LEN) */
    struct name *names;      /* open addressing, cap a power of two */
    uint32_t cap, count;
    char *arena;
    size_t arena_len, arena_cap;
};

static filsys tracked_fs;
static struct dir *dirs; /* open addressing by inode number */
static uint32_t dirs_cap, dirs_count, names_total;

static void resolve(void) {
    if (lib.resolved)
        return;
    lib.link = (link_fn *)dlsym(RTLD_NEXT, "ext2fs_link");
    lib.lookup = (lookup_fn *)dlsym(RTLD_NEXT, "ext2fs_lookup");
    lib.unlink = (unlink_fn *)dlsym(RTLD_NEXT, "ext2fs_unlink");
    lib.read_inode = (read_inode_fn *)dlsym(RTLD_DEFAULT, "ext2fs_read_inode");
    lib.bmap2 = (bmap2_fn *)dlsym(RTLD_DEFAULT, "ext2fs_bmap2");
    lib.read_block = (dir_block_fn *)dlsym(RTLD_DEFAULT, "ext2fs_read_dir_block4");
    lib.write_block = (dir_block_fn *)dlsym(RTLD_DEFAULT, "ext2fs_write_dir_block4");
    lib.resolved = 1;
}

static uint32_t u32(const void *p, size_t off) {
    uint32_t v;
    memcpy(&v, (const char *)p + off, 4);
    return v;
}

static uint16_t u16(const void *p, size_t off) {
    uint16_t v;
    memcpy(&v, (const char *)p + off, 2);
    return v;
}

static void put16(void *p, size_t off, uint16_t v) { memcpy((char *)p + off, &v, 2); }
static void put32(void *p, size_t off, uint32_t v) { memcpy((char *)p + off, &v, 4); }

static uint32_t fnv(const char *s, uint32_t len) {
    uint32_t h = 2166136261u;
    for (uint32_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static void forget_dir(struct dir *d) {
    names_total -= d->count;
    free(d->room);
    free(d->names);
    free(d->arena);
    d->room = NULL;
    d->names = NULL;
    d->arena = NULL;
    d->nblocks = d->first = d->cap = d->count = 0;
    d->arena_len = d->arena_cap = 0;
}

static void forget_all(void) {
    for (uint32_t i = 0; i < dirs_cap; i++)
        forget_dir(&dirs[i]);
    free(dirs);
    dirs = NULL;
    dirs_cap = dirs_count = names_total = 0;
}

/* The block size when this handle is a filesystem this library handles, else 0. */
static unsigned handled_blocksize(filsys fs) {
    resolve();
    if (!fs || !lib.link || !lib.lookup || !lib.read_inode || !lib.bmap2 || !lib.read_block || !lib.write_block)
        return 0;
    if (*(errcode_t *)((char *)fs + FS_MAGIC_OFF) != ET_MAGIC_EXT2FS_FILSYS)
        return 0;
    const char *sb = *(const char **)((char *)fs + FS_SUPER_OFF);
    unsigned bs = *(unsigned *)((char *)fs + FS_BLOCKSIZE_OFF);
    if (!sb || u32(sb, SB_LOG_BLOCK_SIZE) > 5 || bs != (1024u << u32(sb, SB_LOG_BLOCK_SIZE)) || bs >= 65536)
        return 0;
    if (u32(sb, SB_FEATURE_INCOMPAT) & (INCOMPAT_DIRDATA | INCOMPAT_INLINE_DATA | INCOMPAT_ENCRYPT | INCOMPAT_CASEFOLD))
        return 0;
    if (fs != tracked_fs) {
        forget_all();
        tracked_fs = fs;
    }
    return bs;
}

static struct dir *slot_for(ino_t32 ino, int create) {
    if (create && (dirs_count + 1) * 2 > dirs_cap) {
        uint32_t cap = dirs_cap ? dirs_cap * 2 : 64;
        struct dir *grown = calloc(cap, sizeof *grown);
        if (!grown)
            return NULL;
        for (uint32_t i = 0; i < dirs_cap; i++)
            if (dirs[i].ino) {
                uint32_t j = dirs[i].ino * 2654435761u & (cap - 1);
                while (grown[j].ino)
                    j = (j + 1) & (cap - 1);
                grown[j] = dirs[i];
            }
        free(dirs);
        dirs = grown;
        dirs_cap = cap;
    }
    if (!dirs_cap)
        return NULL;
    uint32_t j = ino * 2654435761u & (dirs_cap - 1);
    while (dirs[j].ino && dirs[j].ino != ino)
        j = (j + 1) & (dirs_cap - 1);
    if (!dirs[j].ino) {
        if (!create)
            return NULL;
        dirs[j].ino = ino;
        dirs_count++;
    }
    return &dirs[j];
}

static int add_name(struct dir *d, const char *s, uint32_t len, ino_t32 ino) {
    if ((d->count + 1) * 2 > d->cap) {
        uint32_t cap = d->cap ? d->cap * 2 : 256;
        struct name *grown = calloc(cap, sizeof *grown);
        if (!grown)
            return -1;
        for (uint32_t i = 0; i < d->cap; i++)
            if (d->names[i].ino) {
                uint32_t j = d->names[i].hash & (cap - 1);
                while (grown[j].ino)
                    j = (j + 1) & (cap - 1);
                grown[j] = d->names[i];
            }
        free(d->names);
        d->names = grown;
        d->cap = cap;
    }
    if (d->arena_len + len > d->arena_cap) {
        size_t cap = (d->arena_cap + len) * 2;
        char *grown = realloc(d->arena, cap);
        if (!grown)
            return -1;
        d->arena = grown;
        d->arena_cap = cap;
    }
    memcpy(d->arena + d->arena_len, s, len);
    uint32_t h = fnv(s, len), j = h & (d->cap - 1);
    while (d->names[j].ino)
        j = (j + 1) & (d->cap - 1);
    d->names[j] = (struct name){h, ino, (uint32_t)d->arena_len, len};
    d->arena_len += len;
    d->count++;
    names_total++;
    return 0;
}

static ino_t32 find_name(const struct dir *d, const char *s, uint32_t len) {
    if (!d->cap)
        return 0;
    uint32_t h = fnv(s, len), j = h & (d->cap - 1);
    for (; d->names[j].ino; j = (j + 1) & (d->cap - 1))
        if (d->names[j].hash == h && d->names[j].len == len && !memcmp(d->arena + d->names[j].off, s, len))
            return d->names[j].ino;
    return 0;
}

/* Walk one directory block: its largest room for an entry (REC_LEN) into *room, and with names the names
   into d. -1 when it is not a block as mke2fs leaves it (see the top). */
static int walk_block(const char *buf, unsigned end, struct dir *d, int names, unsigned *room) {
    unsigned off = 0, best = 0;
    while (off < end) {
        uint32_t ino = u32(buf, off);
        unsigned rec = u16(buf, off + 4), len = (unsigned char)buf[off + 6];
        if (rec < 12 || rec % 4 || off + rec > end)
            return -1;
        unsigned avail;
        if (!ino) {
            if (off)
                return -1;
            avail = rec;
        } else {
            if (REC_LEN(len) > rec)
                return -1;
            avail = rec - REC_LEN(len);
            if (names && add_name(d, buf + off + 8, len, ino))
                return -1;
        }
        if (avail > best)
            best = avail;
        off += rec;
    }
    *room = best;
    return off == end ? 0 : -1;
}

static unsigned block_end(filsys fs, unsigned bs) {
    const char *sb = *(const char **)((char *)fs + FS_SUPER_OFF);
    return bs - ((u32(sb, SB_FEATURE_RO_COMPAT) & RO_COMPAT_METADATA_CSUM) ? TAIL_SIZE : 0);
}

/* The directory's state brought up to its current blocks, or NULL when libext2fs must do the work. */
static struct dir *current(filsys fs, ino_t32 dir, unsigned bs, char *inode, char *buf) {
    struct dir *d = slot_for(dir, 0);
    if (lib.read_inode(fs, dir, inode))
        goto untracked;
    uint64_t size = u32(inode, INODE_SIZE) | (uint64_t)u32(inode, INODE_SIZE_HIGH) << 32;
    if ((u16(inode, INODE_MODE) & 0xF000) != 0x4000 || u32(inode, INODE_FLAGS) & (INDEX_FL | INLINE_DATA_FL) ||
        size % bs || size / bs < 2 || size / bs > 0xffffffu)
        goto untracked;
    uint32_t nblocks = (uint32_t)(size / bs);
    if (!d) {
        if (names_total > MAX_NAMES)
            forget_all();
        d = slot_for(dir, 1);
        if (!d)
            return NULL;
    }
    if (nblocks < d->nblocks)
        goto untracked;
    if (nblocks > d->nblocks) {
        uint16_t *room = realloc(d->room, nblocks * sizeof *room);
        if (!room)
            goto untracked;
        d->room = room;
        for (uint32_t b = d->nblocks; b < nblocks; b++) {
            blk64_t pblk = 0;
            int ret_flags = 0;
            unsigned r;
            if (lib.bmap2(fs, dir, inode, NULL, 0, b, &ret_flags, &pblk) || !pblk || ret_flags ||
                lib.read_block(fs, pblk, buf, 0, dir) || walk_block(buf, block_end(fs, bs), d, 1, &r))
                goto untracked;
            d->room[b] = (uint16_t)r;
            d->nblocks = b + 1;
        }
    }
    return d;
untracked:
    if (d)
        forget_dir(d);
    return NULL;
}

/* Put the entry in the first entry of block b with room for it, as link_proc does (a used entry keeps its
   own REC_LEN and the new one takes the rest; an empty first entry is taken whole). */
static int place(char *buf, unsigned end, const char *name, unsigned len, ino_t32 ino, int flags, int filetype) {
    unsigned need = REC_LEN(len), off = 0;
    while (off < end) {
        unsigned rec = u16(buf, off + 4), min = REC_LEN((unsigned char)buf[off + 6]);
        char *e = NULL;
        if (!u32(buf, off) && rec >= need) {
            e = buf + off;
        } else if (u32(buf, off) && rec >= min + need) {
            put16(buf, off + 4, (uint16_t)min);
            e = buf + off + min;
            put16(e, 4, (uint16_t)(rec - min));
        }
        if (e) {
            put32(e, 0, ino);
            e[6] = (char)len;
            e[7] = filetype ? (char)(flags & LINK_FT_MASK) : 0;
            memcpy(e + 8, name, len);
            return 0;
        }
        off += rec;
    }
    return -1;
}

errcode_t ext2fs_link(filsys fs, ino_t32 dir, const char *name, ino_t32 ino, int flags) {
    unsigned bs = handled_blocksize(fs);
    if (!bs || !name || flags & ~LINK_FT_MASK) {
        struct dir *d = bs ? slot_for(dir, 0) : NULL;
        if (d)
            forget_dir(d);
        return lib.link(fs, dir, name, ino, flags);
    }
    char inode[256], *buf = malloc(bs);
    size_t len = strlen(name);
    struct dir *d = buf && len && len <= 255 ? current(fs, dir, bs, inode, buf) : NULL;
    if (!d) {
        free(buf);
        return lib.link(fs, dir, name, ino, flags);
    }
    unsigned need = REC_LEN(len), end = block_end(fs, bs);
    const char *sb = *(const char **)((char *)fs + FS_SUPER_OFF);
    uint32_t b = d->first;
    while (b < d->nblocks && d->room[b] < need)
        b++;
    while (d->first < d->nblocks && d->room[d->first] < REC_LEN(1))
        d->first++;
    if (b == d->nblocks) {
        free(buf);
        return ET_DIR_NO_SPACE; /* mke2fs then expands the directory and links again */
    }
    blk64_t pblk = 0;
    int ret_flags = 0;
    unsigned r;
    if (lib.bmap2(fs, dir, inode, NULL, 0, b, &ret_flags, &pblk) || !pblk || ret_flags ||
        lib.read_block(fs, pblk, buf, 0, dir) ||
        place(buf, end, name, (unsigned)len, ino, flags, u32(sb, SB_FEATURE_INCOMPAT) & INCOMPAT_FILETYPE) ||
        walk_block(buf, end, d, 0, &r)) {
        forget_dir(d);
        free(buf);
        return lib.link(fs, dir, name, ino, flags);
    }
    errcode_t err = lib.write_block(fs, pblk, buf, 0, dir);
    free(buf);
    if (err) {
        forget_dir(d);
        return err;
    }
    d->room[b] = (uint16_t)r;
    if (add_name(d, name, (uint32_t)len, ino))
        forget_dir(d);
    return 0;
}

errcode_t ext2fs_lookup(filsys fs, ino_t32 dir, const char *name, int namelen, char *scratch, ino_t32 *inode) {
    unsigned bs = handled_blocksize(fs);
    if (!bs || !name || namelen <= 0 || namelen > 255)
        return lib.lookup(fs, dir, name, namelen, scratch, inode);
    char raw[256], *buf = malloc(bs);
    struct dir *d = buf ? current(fs, dir, bs, raw, buf) : NULL;
    free(buf);
    if (!d)
        return lib.lookup(fs, dir, name, namelen, scratch, inode);
    ino_t32 found = find_name(d, name, (uint32_t)namelen);
    if (!found)
        return ET_FILE_NOT_FOUND;
    *inode = found;
    return 0;
}

errcode_t ext2fs_unlink(filsys fs, ino_t32 dir, const char *name, ino_t32 ino, int flags) {
    resolve();
    struct dir *d = fs == tracked_fs ? slot_for(dir, 0) : NULL;
    if (d)
        forget_dir(d);
    return lib.unlink(fs, dir, name, ino, flags);
}

/* For the tests: how many directories' names are kept now. */
unsigned e2fsdir_tracked(void) {
    unsigned n = 0;
    for (uint32_t i = 0; i < dirs_cap; i++)
        n += dirs[i].nblocks > 0;
    return n;
}

#endif
