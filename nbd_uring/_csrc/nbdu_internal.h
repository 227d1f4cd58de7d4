/* What nbdu.c and lane.c share and Python does not see. */
#ifndef NBDU_INTERNAL_H
#define NBDU_INTERNAL_H
#include <liburing.h>

struct io_uring *nbdu_ring_uring(struct nbdu_ring *r);
void nbdu_ring_set_lane(struct nbdu_ring *r, struct nbdu_lane *lane);
void nbdu_lane_complete(struct nbdu_lane *lane, uint64_t user_data, int32_t res);

#define NBDU_LANE_BIT (1ULL << 63)
#endif
