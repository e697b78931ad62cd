/* LD_PRELOAD library for e2fsprogs (mkfs.ext4, debugfs, e2fsck, tune2fs; builder/sandbox/e2fscrc.py): their
   metadata checksums (CRC-32C) with the CPU's crc32 instruction instead of libext2fs' table code.

   With metadata_csum, `mkfs.ext4 -d` checksums every inode, directory and extent block each time it
   writes one: at a 1 GiB closure about 4 million calls over 1.3 GB, a fifth of its time in Debian's
   e2fsprogs 1.47.0. libext2fs calls its exported ext2fs_crc32c_le through its PLT, so a definition
   loaded first takes those calls. The function (crc in, no inversion, bytes in order; reflected
   polynomial 0x82F63B78, lib/ext2fs/crc32c.c) is the one SSE4.2's crc32 computes, so the image's bytes
   do not change. The instruction is used only when the CPU has it and it gives libext2fs' own results
   on a test buffer; else every call goes to libext2fs' function. Elsewhere than x86-64 this library
   defines nothing, and the table code runs as without it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)

typedef uint32_t crc_fn(uint32_t crc, unsigned char const *p, size_t len);

__attribute__((target("sse4.2"))) static uint32_t crc_instruction(uint32_t crc, unsigned char const *p, size_t len) {
    uint64_t c = crc;
    for (; len && ((uintptr_t)p & 7); len--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    for (; len >= 8; len -= 8, p += 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
    }
    for (; len; len--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}

/* Bit by bit: for a process whose libext2fs could not be found to compare with (none calls this then). */
static uint32_t crc_bitwise(uint32_t crc, unsigned char const *p, size_t len) {
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & -(crc & 1));
    }
    return crc;
}

/* The instruction when it agrees with `real` over every alignment and length of a test buffer. */
static crc_fn *choose(crc_fn *real) {
    if (!real)
        return crc_bitwise;
    if (!__builtin_cpu_supports("sse4.2"))
        return real;
    unsigned char buf[4096 + 64];
    uint32_t x = 0x12345678u;
    for (size_t i = 0; i < sizeof buf; i++) {
        x = x * 1103515245u + 12345u;
        buf[i] = (unsigned char)(x >> 16);
    }
    for (size_t start = 0; start < 16; start++)
        for (size_t len = 0; len <= 64; len++)
            if (crc_instruction(~0u, buf + start, len) != real(~0u, buf + start, len))
                return real;
    if (crc_instruction(0x9e3779b9u, buf + 3, 4096) != real(0x9e3779b9u, buf + 3, 4096))
        return real;
    return crc_instruction;
}

static crc_fn *chosen(void) {
    static crc_fn *fn;
    if (!fn) /* e2fsprogs is single-threaded; a second chooser would choose the same */
        fn = choose((crc_fn *)dlsym(RTLD_NEXT, "ext2fs_crc32c_le"));
    return fn;
}

uint32_t ext2fs_crc32c_le(uint32_t crc, unsigned char const *p, size_t len) {
    return chosen()(crc, p, len);
}

/* For the tests: 1 when the crc32 instruction computes the checksums, 0 when libext2fs' code does. */
int e2fscrc_uses_instruction(void) {
    return chosen() == crc_instruction;
}

#endif
