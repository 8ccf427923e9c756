// LD_PRELOAD library: make this process (and its children) see an x86 CPU without AVX-512, VNNI or
// AMX through CPUID (BERTFORGE_AS_CPU=avx512: with AVX-512 F/CD/BW/DQ/VL but no VNNI, AMX or later
// AVX-512 extensions, a Skylake-SP), using the kernel's CPUID faulting (arch_prctl ARCH_SET_CPUID).
// Every CPUID then raises SIGSEGV; the handler runs the real CPUID with faulting briefly off, clears
// the masked bits and steps over the instruction. Other SIGSEGVs go to whatever handler the program
// installed.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

// CPUID faulting is a per-thread flag that new threads and fork() inherit and execve() clears (the
// preload sets it again in the new program).
#define ARCH_SET_CPUID 0x1012

static struct sigaction chained;  // the program's own SIGSEGV disposition
static int installed;
static int keep_avx512;  // BERTFORGE_AS_CPU=avx512: the AVX-512 core set stays
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        // EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31
        uint32_t core = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
        r[1] &= ~((1u << 21) | (1u << 26) | (1u << 27) | (keep_avx512 ? 0u : core));
        // ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        // EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24, AMX-INT8 25
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        // EAX: AVX-VNNI 4, AVX512-BF16 5, AVX-IFMA 23; EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AVX10 19
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 23));
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 19));
    } else if (leaf == 0xd && sub == 0) {
        r[0] &= ~((1u << 17) | (1u << 18));  // AMX tile state
        if (!keep_avx512) r[0] &= ~((1u << 5) | (1u << 6) | (1u << 7));  // opmask, ZMM state
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = (ucontext_t *)context;
    unsigned char *rip = (unsigned char *)uc->uc_mcontext.gregs[REG_RIP];
    if (info->si_code == SI_KERNEL && rip[0] == 0x0f && rip[1] == 0xa2) {
        uint32_t r[4];
        uint32_t leaf = (uint32_t)uc->uc_mcontext.gregs[REG_RAX];
        uint32_t sub = (uint32_t)uc->uc_mcontext.gregs[REG_RCX];
        real_cpuid(leaf, sub, r);
        mask(leaf, sub, r);
        uc->uc_mcontext.gregs[REG_RAX] = r[0];
        uc->uc_mcontext.gregs[REG_RBX] = r[1];
        uc->uc_mcontext.gregs[REG_RCX] = r[2];
        uc->uc_mcontext.gregs[REG_RDX] = r[3];
        uc->uc_mcontext.gregs[REG_RIP] += 2;
        return;
    }
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, context);
        return;
    }
    if (chained.sa_handler == SIG_IGN) return;
    if (chained.sa_handler != SIG_DFL) {
        chained.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction(SIGSEGV, &dfl, NULL);  // re-executing the instruction faults again, to the default
}

// The program's own SIGSEGV handler is kept as `chained` and ours stays installed. glibc's signal()
// does not come through here; Python, Node (V8) and Ray install theirs with sigaction.
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !installed) return real_sigaction(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

__attribute__((constructor)) static void start(void) {
    real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    const char *as = getenv("BERTFORGE_AS_CPU");
    keep_avx512 = as != NULL && strcmp(as, "avx512") == 0;
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_segv;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    real_sigaction(SIGSEGV, &ours, &chained);
    installed = 1;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
