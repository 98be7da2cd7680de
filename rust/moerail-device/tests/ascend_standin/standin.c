/* A stand-in for CANN's libascendcl.so and libhccl.so (the tests build it twice, once under each
 * name): the same C prototypes as acl.h / hccl.h, no device. Every call appends one line to the
 * file named by STANDIN_LOG: the function and the arguments it received (host arrays expanded).
 * STANDIN_FAIL=<function>:<code> makes that function return <code>; STANDIN_ACL_REPEAT=1 makes
 * aclInit answer 100002 (already initialised). HcclAlltoAllV copies the block a rank sends to
 * itself (so a one-rank exchange moves real data); nothing else touches memory.
 *
 * STANDIN_RDV_DIR=<dir> makes the collectives real across processes (device pointers are host
 * pointers here): HcclGetRootInfo makes a fresh folder under <dir> and puts its path in the root
 * info; each collective of a communicator writes the rank's counts and send buffer to a file
 * there, waits (STANDIN_TIMEOUT_S, default 60) for every peer's file and reads its own block of
 * each. A peer whose counts disagree with the receiver's is HCCL_E_PARA (1); no peer in time is
 * HCCL_E_TIMEOUT (9). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef void* aclrtStream;
typedef void* HcclComm;
typedef struct { char internal[4108]; } HcclRootInfo;

static void logf_(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void logf_(const char* fmt, ...) {
  const char* path = getenv("STANDIN_LOG");
  if (!path) return;
  FILE* f = fopen(path, "a");
  if (!f) return;
  va_list ap;
  va_start(ap, fmt);
  vfprintf(f, fmt, ap);
  va_end(ap);
  fputc('\n', f);
  fclose(f);
}

static int fail_code(const char* fn) {
  const char* s = getenv("STANDIN_FAIL");
  size_t n = strlen(fn);
  if (s && strncmp(s, fn, n) == 0 && s[n] == ':') return atoi(s + n + 1);
  return 0;
}

static void arr(char* buf, size_t cap, const uint64_t* a, uint32_t n) {
  size_t o = 0;
  o += snprintf(buf + o, cap - o, "[");
  for (uint32_t i = 0; i < n && o < cap; i++) o += snprintf(buf + o, cap - o, i ? ",%llu" : "%llu", (unsigned long long)a[i]);
  if (o < cap) snprintf(buf + o, cap - o, "]");
}

/* ---- ACL ---- */
static int acl_inits = 0;
int aclInit(const char* configPath) {
  acl_inits++;
  logf_("aclInit config=%s count=%d", configPath ? configPath : "NULL", acl_inits);
  if (getenv("STANDIN_ACL_REPEAT")) return 100002;
  return fail_code("aclInit");
}
int aclFinalize(void) { logf_("aclFinalize"); return 0; }
int aclrtSetDevice(int32_t d) { logf_("aclrtSetDevice %d", d); return fail_code("aclrtSetDevice"); }
int aclrtGetDevice(int32_t* d) { *d = 0; logf_("aclrtGetDevice"); return 0; }
int aclrtGetDeviceCount(uint32_t* n) { *n = 8; logf_("aclrtGetDeviceCount"); return fail_code("aclrtGetDeviceCount"); }
int aclrtCreateStream(aclrtStream* s) { *s = (void*)0x5157; logf_("aclrtCreateStream"); return 0; }
int aclrtDestroyStream(aclrtStream s) { logf_("aclrtDestroyStream %p", s); return 0; }
int aclrtSynchronizeStream(aclrtStream s) { logf_("aclrtSynchronizeStream %p", s); return fail_code("aclrtSynchronizeStream"); }
int aclrtMemcpy(void* dst, size_t destMax, const void* src, size_t count, int kind) {
  logf_("aclrtMemcpy dst=%p max=%zu src=%p count=%zu kind=%d", dst, destMax, src, count, kind);
  if (count <= destMax) memcpy(dst, src, count);
  return fail_code("aclrtMemcpy");
}
int aclrtMemcpyAsync(void* dst, size_t destMax, const void* src, size_t count, int kind, aclrtStream s) {
  logf_("aclrtMemcpyAsync dst=%p max=%zu src=%p count=%zu kind=%d stream=%p", dst, destMax, src, count, kind, s);
  if (count <= destMax) memcpy(dst, src, count);
  return fail_code("aclrtMemcpyAsync");
}
int aclrtGetVersion(int32_t* major, int32_t* minor, int32_t* patch) { *major = 8; *minor = 0; *patch = 1; return 0; }

/* ---- HCCL ---- */
#define RDV_AT 16 /* where the rendezvous folder's path sits in the root info */
struct comm { uint32_t magic, n, rank, seq; char rdv[1024]; };
int HcclGetRootInfo(HcclRootInfo* r) {
  memset(r->internal, 0, sizeof r->internal);
  memcpy(r->internal, "standin-root", 12);
  r->internal[4107] = 0x7f;
  const char* dir = getenv("STANDIN_RDV_DIR");
  if (dir) {
    char tmpl[1024];
    snprintf(tmpl, sizeof tmpl, "%s/rdv-XXXXXX", dir);
    if (!mkdtemp(tmpl)) return 4;
    snprintf(r->internal + RDV_AT, 1024, "%s", tmpl);
  }
  logf_("HcclGetRootInfo");
  return fail_code("HcclGetRootInfo");
}

/* One collective's file of this rank: header words, then payload. Written whole, then renamed,
 * so a reader never sees half of it. */
static int rdv_write(const struct comm* c, const char* kind, const uint64_t* head, size_t nhead, const void* data,
                     size_t nbytes) {
  char path[1200], tmp[1300];
  snprintf(path, sizeof path, "%s/%s-%u-%u", c->rdv, kind, c->seq, c->rank);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE* f = fopen(tmp, "wb");
  if (!f) return 4;
  size_t ok = fwrite(head, sizeof *head, nhead, f) == nhead && (nbytes == 0 || fwrite(data, 1, nbytes, f) == nbytes);
  if (fclose(f) != 0 || !ok) return 4;
  return rename(tmp, path) == 0 ? 0 : 4;
}

/* The whole file of rank `peer` for this collective (malloc'd), once it exists. */
static char* rdv_read(const struct comm* c, const char* kind, uint32_t peer, size_t* size) {
  char path[1200];
  snprintf(path, sizeof path, "%s/%s-%u-%u", c->rdv, kind, c->seq, peer);
  const char* t = getenv("STANDIN_TIMEOUT_S");
  double limit = t ? atof(t) : 60.0, waited = 0;
  FILE* f;
  while (!(f = fopen(path, "rb"))) {
    if (waited >= limit) return NULL;
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
    waited += 1e-3;
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char* buf = malloc(n > 0 ? (size_t)n : 1);
  size_t got = fread(buf, 1, (size_t)n, f);
  fclose(f);
  *size = got;
  return buf;
}
int HcclCommInitRootInfo(uint32_t nRanks, const HcclRootInfo* r, uint32_t rank, HcclComm* comm) {
  int rc = fail_code("HcclCommInitRootInfo");
  logf_("HcclCommInitRootInfo n=%u rank=%u root=%.12s last=%d", nRanks, rank, r->internal, (int)r->internal[4107]);
  if (rc) return rc;
  struct comm* c = malloc(sizeof *c);
  c->magic = 0xC0FFEE; c->n = nRanks; c->rank = rank; c->seq = 0;
  memcpy(c->rdv, r->internal + RDV_AT, sizeof c->rdv - 1);
  c->rdv[sizeof c->rdv - 1] = 0;
  *comm = c;
  return 0;
}
static size_t type_size(int t) {
  switch (t) { case 0: case 7: return 1; case 1: case 3: case 8: case 11: return 2; case 2: case 4: case 9: return 4;
               case 5: case 6: case 10: return 8; case 12: return 16; default: return 0; }
}
int HcclAlltoAllV(const void* sendBuf, const void* sendCounts, const void* sdispls, int sendType, const void* recvBuf,
                  const void* recvCounts, const void* rdispls, int recvType, HcclComm comm, aclrtStream stream) {
  struct comm* c = comm;
  if (!c || c->magic != 0xC0FFEE) { logf_("HcclAlltoAllV bad comm %p", comm); return 2; }
  char a[512], b[512], d[512], e[512];
  arr(a, sizeof a, sendCounts, c->n); arr(b, sizeof b, sdispls, c->n);
  arr(d, sizeof d, recvCounts, c->n); arr(e, sizeof e, rdispls, c->n);
  logf_("HcclAlltoAllV send=%p counts=%s sdispls=%s type=%d recv=%p rcounts=%s rdispls=%s rtype=%d comm=%u/%u stream=%p",
        sendBuf, a, b, sendType, recvBuf, d, e, recvType, c->rank, c->n, stream);
  int rc = fail_code("HcclAlltoAllV");
  if (rc) return rc;
  const uint64_t* sc = sendCounts; const uint64_t* sd = sdispls; const uint64_t* rd = rdispls;
  const uint64_t* rc_ = recvCounts;
  size_t es = type_size(sendType);
  if (!c->rdv[0]) {
    memcpy((char*)recvBuf + rd[c->rank] * es, (const char*)sendBuf + sd[c->rank] * es, sc[c->rank] * es);
    return 0;
  }
  /* header: n, element size, counts[n], displs[n]; payload: the send buffer up to its last block */
  uint64_t head[2 + 2 * 512], extent = 0;
  if (c->n > 512) return 1;
  head[0] = c->n; head[1] = es;
  for (uint32_t p = 0; p < c->n; p++) {
    head[2 + p] = sc[p]; head[2 + c->n + p] = sd[p];
    if (sc[p] && sd[p] + sc[p] > extent) extent = sd[p] + sc[p];
  }
  if ((rc = rdv_write(c, "a2a", head, 2 + 2 * (size_t)c->n, sendBuf, extent * es))) return rc;
  for (uint32_t p = 0; p < c->n && !rc; p++) {
    size_t size = 0;
    char* f = rdv_read(c, "a2a", p, &size);
    if (!f) { rc = 9; break; }
    const uint64_t* h = (const uint64_t*)f;
    uint64_t cnt = h[2 + c->rank], off = h[2 + c->n + c->rank];
    size_t start = (2 + 2 * (size_t)c->n) * sizeof(uint64_t) + off * es;
    if (h[0] != c->n || h[1] != es || cnt != rc_[p] || start + cnt * es > size) {
      logf_("HcclAlltoAllV rank %u: peer %u sends %llu, expected %llu", c->rank, p, (unsigned long long)cnt,
            (unsigned long long)rc_[p]);
      rc = 1;
    } else {
      memcpy((char*)recvBuf + rd[p] * es, f + start, cnt * es);
    }
    free(f);
  }
  c->seq++;
  return rc;
}
int HcclAllGather(void* sendBuf, void* recvBuf, uint64_t count, int type, HcclComm comm, aclrtStream stream) {
  struct comm* c = comm;
  logf_("HcclAllGather send=%p recv=%p count=%llu type=%d comm=%u/%u stream=%p", sendBuf, recvBuf,
        (unsigned long long)count, type, c ? c->rank : 0, c ? c->n : 0, stream);
  int rc = fail_code("HcclAllGather");
  if (rc) return rc;
  size_t es = type_size(type);
  if (!c->rdv[0]) {
    memcpy((char*)recvBuf + (size_t)c->rank * count * es, sendBuf, count * es);
    return 0;
  }
  uint64_t head[2] = {count, es};
  if ((rc = rdv_write(c, "ag", head, 2, sendBuf, count * es))) return rc;
  for (uint32_t p = 0; p < c->n && !rc; p++) {
    size_t size = 0;
    char* f = rdv_read(c, "ag", p, &size);
    if (!f) { rc = 9; break; }
    const uint64_t* h = (const uint64_t*)f;
    if (h[0] != count || h[1] != es || size != 2 * sizeof(uint64_t) + count * es) rc = 1;
    else memcpy((char*)recvBuf + (size_t)p * count * es, f + 2 * sizeof(uint64_t), count * es);
    free(f);
  }
  c->seq++;
  return rc;
}
int HcclCommDestroy(HcclComm comm) {
  struct comm* c = comm;
  logf_("HcclCommDestroy comm=%u/%u", c ? c->rank : 0, c ? c->n : 0);
  free(c);
  return 0;
}
const char* HcclGetErrorString(int code) { return code == 4 ? "internal error (stand-in)" : "stand-in error"; }
