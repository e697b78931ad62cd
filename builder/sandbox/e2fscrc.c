/* LD_PRELOAD library for e2fsprogs (mkfs.ext4, debugfs, e2fsck, tune2fs; builder/sandbox/e2fscrc.py): their
   metadata checksums (CRC-32C) with the CPU's crc32 instruction instead of libext2fs' table code.

   With metadata_csum, `mkfs.ext4 -d` checksums every inode, directory and extent block each time it
   writes one: at a 1 GiB closure about 4 million calls over 1.3 GB, a fifth of its time in Debian's
   e2fsprogs 1.47.0. libext2fs calls its exported ext2fs_crc32c_le through its PLT, so a definition
   loaded first takes those calls. The function (crc in, no inversion, bytes in order; reflected
   polynomial 0x82F63B78, lib/ext2fs/crc32c.c) is the one SSE4.2's crc32 computes, so the image's bytes
   do not change. The instruction is used only when the CPU has it and it gives libext2fs' own results
   on a test buffer; else every call goes to libext2fs' function. Elsewhere than x86-64 this library
   defines nothing, and the table code runs as without it. The dynamic loader splits LD_PRELOAD at
   spaces and colons, so its path must have neither (builder/sandbox/preload.py sees to it). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)

typedef uint32_t crc_fn(uint32_t crc, unsigned char const *p, size_t len);

uint32_t ext2fs_crc32c_le(uint32_t crc, unsigned char const *p, size_t len);
static crc_fn *chosen_fn;

/* The instruction's CRC has a latency of 3 cycles and a throughput of 1 a cycle: one serial stream of it uses a
   third of the unit. Buffers of 3 * SPAN bytes or more are taken 3 streams at a time (SPAN bytes each, the
   first from the running crc and the others from 0), then put together: the crc register is linear in its
   start and the data, so crc(c, A B C) = shift(crc(c, A), 2 SPAN) ^ shift(crc(0, B), SPAN) ^ crc(0, C),
   where shift(x, n) is the register after n zero bytes from x, a linear map looked up a byte of x at a time
   (tables made once, from the instruction itself on zero bytes). */
#define SPAN 256
static uint32_t shift_span[2][4][256]; /* [0]: by SPAN bytes, [1]: by 2 * SPAN */

__attribute__((target("sse4.2"))) static uint64_t crc_serial(uint64_t c, unsigned char const *p, size_t len) {
    for (; len && ((uintptr_t)p & 7); len--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    for (; len >= 8; len -= 8, p += 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
    }
    for (; len; len--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return c;
}

static uint32_t shifted(const uint32_t table[4][256], uint32_t x) {
    return table[0][x & 0xff] ^ table[1][(x >> 8) & 0xff] ^ table[2][(x >> 16) & 0xff] ^ table[3][x >> 24];
}

static void make_shift_tables(void) {
    static const unsigned char zeros[2 * SPAN];
    for (int which = 0; which < 2; which++)
        for (int byte = 0; byte < 4; byte++)
            for (uint32_t b = 0; b < 256; b++)
                shift_span[which][byte][b] = (uint32_t)crc_serial(b << (8 * byte), zeros, (size_t)(which + 1) * SPAN);
}

__attribute__((target("sse4.2"))) static uint32_t crc_instruction(uint32_t crc, unsigned char const *p, size_t len) {
    uint64_t c = crc;
    for (; len && ((uintptr_t)p & 7); len--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    for (; len >= 3 * SPAN; len -= 3 * SPAN, p += 3 * SPAN) {
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < SPAN; i += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, p + i, 8);
            memcpy(&w1, p + SPAN + i, 8);
            memcpy(&w2, p + 2 * SPAN + i, 8);
            c = __builtin_ia32_crc32di(c, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
        }
        c = shifted(shift_span[1], (uint32_t)c) ^ shifted(shift_span[0], (uint32_t)c1) ^ (uint32_t)c2;
    }
    return (uint32_t)crc_serial(c, p, len);
}

/* Bit by bit, from the definition: what the instruction is checked against when libext2fs' own function
   cannot be found (a libext2fs loaded with RTLD_LOCAL by dlopen is not in RTLD_NEXT's reach). */
static uint32_t crc_bitwise(uint32_t crc, unsigned char const *p, size_t len) {
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & -(crc & 1));
    }
    return crc;
}

/* libext2fs' own function: the next definition after this library's, else the one of a libext2fs
   already loaded privately; NULL when there is none (then nothing in the process calls this one). */
static crc_fn *libext2fs_function(void) {
    crc_fn *real = (crc_fn *)dlsym(RTLD_NEXT, "ext2fs_crc32c_le");
    if (!real) {
        void *lib = dlopen("libext2fs.so.2", RTLD_LAZY | RTLD_NOLOAD);
        if (lib)
            real = (crc_fn *)dlsym(lib, "ext2fs_crc32c_le");
    }
    return real == ext2fs_crc32c_le ? NULL : real;
}

/* The instruction when it agrees with the reference (libext2fs' function, else the definition) over
   every alignment and many lengths of a test buffer; else the reference itself. */
static crc_fn *choose(void) {
    crc_fn *real = libext2fs_function();
    crc_fn *reference = real ? real : crc_bitwise;
    if (!__builtin_cpu_supports("sse4.2"))
        return reference;
    make_shift_tables();
    unsigned char buf[4096 + 64];
    uint32_t x = 0x12345678u;
    for (size_t i = 0; i < sizeof buf; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = (unsigned char)(x >> 16);
    }
    for (size_t start = 0; start < 16; start++)
        for (size_t len = 0; len <= 64; len++)
            if (crc_instruction(~0u, buf + start, len) != reference(~0u, buf + start, len))
                return reference;
    for (size_t len = 3 * SPAN - 9; len <= 4096; len += 251) /* the 3 streams, once and many times, with tails */
        if (crc_instruction(0x9e3779b9u, buf + 3, len) != reference(0x9e3779b9u, buf + 3, len))
            return reference;
    if (crc_instruction(0x9e3779b9u, buf + 3, 4096) != reference(0x9e3779b9u, buf + 3, 4096))
        return reference;
    return crc_instruction;
}

static crc_fn *chosen(void) {
    crc_fn *fn = __atomic_load_n(&chosen_fn, __ATOMIC_ACQUIRE);
    if (!fn) { /* two threads choosing at once choose the same (and make the same tables) */
        fn = choose();
        __atomic_store_n(&chosen_fn, fn, __ATOMIC_RELEASE);
    }
    return fn;
}

uint32_t ext2fs_crc32c_le(uint32_t crc, unsigned char const *p, size_t len) {
    return chosen()(crc, p, len);
}

/* For the tests: 1 when the crc32 instruction computes the checksums, 0 when the reference does. */
int e2fscrc_uses_instruction(void) {
    return chosen() == crc_instruction;
}

#endif
