// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Test-only: a tc program the verifier must reject (packet read without a bounds check), so a
 * test can prove the loader surfaces the verifier log. Never shipped in the agent. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int meshcni_broken(struct __sk_buff *skb)
{
	unsigned char *data = (void *)(long)skb->data;

	return data[64] == 1 ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
