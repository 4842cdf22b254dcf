/*
 * mbinfo.c - guest_main of `mbinfo`: print the Multiboot information
 * structure (Multiboot Specification 0.6.96, 3.3) a loader passed, and
 * check where the loader put it.
 *
 * Printed (guests/README.md has the full format): the structure's flags,
 * mem_lower/mem_upper, the command line, the boot loader's name, every
 * module (start, end, size, string and an Adler-32 of its bytes) and every
 * memory-map entry, each with the address it lies at.  Checked: nothing the
 * loader placed is in page 0 or overlaps the kernel (.bss included), the
 * modules are page-aligned (header flags bit 0 asks for it) and do not
 * overlap each other, and memory information is present (bit 1).
 */
#include "rt32.h"

#define PAGE_SIZE       4096
#define TEXT_MAX        1024            /* characters of a string printed */
#define STRING_MAX      65536           /* longest string measured */
#define MODULES_MAX     64
#define MMAP_ENTRIES_MAX 128
#define REGIONS_MAX     (5 + 2 * MODULES_MAX)

struct region {
    uint32_t start, end;                /* [start, end) */
    const char *what;
    uint32_t index;                     /* which module, for a module's regions */
};

static const char MODULE[] = "module";
static struct region regions[REGIONS_MAX];
static uint32_t region_count;

static void add_region(uint32_t start, uint32_t size, const char *what, uint32_t index)
{
    if (region_count < REGIONS_MAX)
        regions[region_count++] = (struct region){start, start + size, what, index};
}

/* `key: addr=0x.. length=N text=...`, and the string as a region (with its NUL). */
static void print_string(const char *key, uint32_t addr)
{
    const char *s = phys(addr);
    uint32_t length = (uint32_t)strnlen(s, STRING_MAX);
    print("%s: addr=0x%x length=%u text=", key, addr, length);
    put_escaped(s, TEXT_MAX);
    put_char('\n');
    add_region(addr, length + 1, key, 0);
}

static void print_modules(const struct multiboot_info *mbi)
{
    const struct multiboot_module *mods = phys(mbi->mods_addr);
    uint32_t count = mbi->mods_count < MODULES_MAX ? mbi->mods_count : MODULES_MAX;
    print("mods_count: %u\n", mbi->mods_count);
    print("mods: addr=0x%x size=%u\n", mbi->mods_addr, mbi->mods_count * (uint32_t)sizeof(*mods));
    add_region(mbi->mods_addr, mbi->mods_count * (uint32_t)sizeof(*mods), "mods", 0);
    for (uint32_t i = 0; i < count; i++) {
        const struct multiboot_module *m = &mods[i];
        uint32_t size = m->mod_end >= m->mod_start ? m->mod_end - m->mod_start : 0;
        const char *string = m->string ? phys(m->string) : "";
        print("module: index=%u start=0x%x end=0x%x size=%u adler32=0x%08x string_addr=0x%x text=", i,
              m->mod_start, m->mod_end, size, adler32(1, phys(m->mod_start), size), m->string);
        put_escaped(string, TEXT_MAX);
        put_char('\n');
        add_region(m->mod_start, size, MODULE, i);
        if (m->string)
            add_region(m->string, (uint32_t)strnlen(string, STRING_MAX) + 1, "module string", i);
    }
}

/* -1 if an entry is malformed */
static int print_mmap(const struct multiboot_info *mbi)
{
    uint32_t p = mbi->mmap_addr, end = mbi->mmap_addr + mbi->mmap_length, entries = 0;
    const struct multiboot_mmap_entry *e;
    for (; p + sizeof(*e) <= end && entries < MMAP_ENTRIES_MAX; p += e->size + 4, entries++) {
        e = phys(p);
        if (e->size < sizeof(*e) - 4)
            return -1;                  /* would not reach the next entry */
    }
    print("mmap: addr=0x%x length=%u entries=%u\n", mbi->mmap_addr, mbi->mmap_length, entries);
    add_region(mbi->mmap_addr, mbi->mmap_length, "mmap", 0);
    for (p = mbi->mmap_addr; entries--; p += e->size + 4) {
        e = phys(p);
        print("mmap_entry: base=0x%llx length=0x%llx type=%u\n", e->base_addr, e->length, e->type);
    }
    return 0;
}

static int overlap(const struct region *a, uint32_t start, uint32_t end)
{
    return a->start < end && start < a->end;
}

/* The loader's placement: returns EXIT_OK or the failure it printed. */
static int check_regions(void)
{
    uint32_t kernel_start = (uint32_t)(uintptr_t)_kernel_start, kernel_end = (uint32_t)(uintptr_t)_kernel_end;
    for (uint32_t i = 0; i < region_count; i++) {
        const struct region *r = &regions[i];
        if (r->end <= r->start)
            continue;                   /* empty */
        if (r->start < PAGE_SIZE)
            return fail(EXIT_FAIL, "%s %u at 0x%x is in page 0", r->what, r->index, r->start);
        if (overlap(r, kernel_start, kernel_end))
            return fail(EXIT_FAIL, "%s %u at 0x%x-0x%x overlaps the kernel", r->what, r->index, r->start, r->end);
    }
    for (uint32_t i = 0; i < region_count; i++) {
        const struct region *r = &regions[i];
        if (r->what != MODULE)
            continue;
        if (r->start % PAGE_SIZE)
            return fail(EXIT_FAIL, "module %u at 0x%x is not page-aligned", r->index, r->start);
        for (uint32_t j = i + 1; j < region_count; j++)
            if (regions[j].what == MODULE && overlap(r, regions[j].start, regions[j].end))
                return fail(EXIT_FAIL, "modules %u and %u overlap", r->index, regions[j].index);
    }
    return EXIT_OK;
}

int guest_main(const struct multiboot_info *mbi)
{
    uint32_t mbi_addr = (uint32_t)(uintptr_t)mbi;
    print("magic: 0x%x\n", MB_LOADER_MAGIC);
    print("kernel: start=0x%x end=0x%x\n", (uint32_t)(uintptr_t)_kernel_start, (uint32_t)(uintptr_t)_kernel_end);
    print("mbi: addr=0x%x size=%u\n", mbi_addr, (uint32_t)sizeof(*mbi));
    add_region(mbi_addr, sizeof(*mbi), "mbi", 0);
    print("flags: 0x%x\n", mbi->flags);
    if (mbi->flags & MBI_MEMORY) {
        print("mem_lower: %u\n", mbi->mem_lower);
        print("mem_upper: %u\n", mbi->mem_upper);
    }
    if (mbi->flags & MBI_BOOT_DEVICE)
        print("boot_device: 0x%x\n", mbi->boot_device);
    if (mbi->flags & MBI_CMDLINE)
        print_string("cmdline", mbi->cmdline);
    if (mbi->flags & MBI_LOADER_NAME)
        print_string("boot_loader_name", mbi->boot_loader_name);
    if (mbi->flags & MBI_MODS)
        print_modules(mbi);
    if ((mbi->flags & MBI_MMAP) && print_mmap(mbi))
        return fail(EXIT_FAIL, "a memory-map entry's size is below 20");
    if (!(mbi->flags & MBI_MEMORY))
        return fail(EXIT_FAIL, "no memory information (header flags bit 1 asks for it)");
    int status = check_regions();
    return status == EXIT_OK ? done_ok() : status;
}
