#!/usr/bin/perl

# Output reservations that do not waste the output limit: providers count
# output as it is produced and let a request that started run into debt,
# so a request reserves what its workspace's answers have produced lately
# (a quarter more, and a little), not all its max_tokens; a workspace
# whose answers are not known yet reserves its cap.  What a request really
# produced is charged when it ends.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-o1-' . Ratepool::Test::random_hex(8);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(writer fresh);

# 9,000 output tokens a minute
my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { $KEY => { org => 'org-o', name => 'o1' } },
    orgs => { 'org-o' => { rpm => 100000, itpm => 1000000, otpm => 9000 } },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-o rpm=100000 itpm=1000000 otpm=9000;
        ratepool_key o1 org=org-o server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace writer;
    ratepool_workspace fresh;
    ratepool_client writer ${\ $t->token_hash($TOKEN{writer})};
    ratepool_client fresh ${\ $t->token_hash($TOKEN{fresh})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            access_log off;
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub ask {
    my ($who, %opt) = @_;
    return $t->messages(token => $TOKEN{$who}, body => { max_tokens => 4096 },
        headers => [ 'x-mock-usage' => encode_json({ output_tokens => 500 }),
                     @{ $opt{headers} || [] } ]);
}

sub org { $t->status->{pools}[0]{orgs}[0] }

# a workspace whose answers are not known yet reserves all it may produce

my $pid = fork // die "fork: $!";
if (!$pid) {
    ask('fresh', headers => [ 'x-mock-delay-ms' => 800 ]);
    exit 0;
}
sleep 0.4;
is(org()->{reserved_output_tokens}, 4096,
   'a first request reserves its max_tokens');
waitpid $pid, 0;

# its answers say what they produce: 500 tokens

is(ask('writer')->{status}, 200, "request $_, one after another") for 1 .. 8;

sleep 10;       # the org refills

# six at once, each producing 500: 3,000 of the org's 6,000 or so left;
# reserving their max_tokens, only one would have fit

my $statuses = $t->parallel(6, sub {
    ask('writer', headers => [ 'x-mock-delay-ms' => 1500 ])->{status};
});
is_deeply($statuses, [ (200) x 6 ],
    'six requests of max_tokens 4,096 that produce 500 go at once');
is(scalar(grep { $_->{status} == 429 } @{ $mock->log }), 0,
   'and the provider refuses none');

$pid = fork // die "fork: $!";
if (!$pid) {
    ask('writer', headers => [ 'x-mock-delay-ms' => 800 ]);
    exit 0;
}
sleep 0.4;
my $reserved = org()->{reserved_output_tokens};
ok($reserved >= 500 && $reserved <= 700,
   'one reserves about what the workspace\'s answers produce')
    or diag "reserved $reserved";
waitpid $pid, 0;

my $org = org();
is($org->{reserved_output_tokens}, 0, 'nothing is held once they end');
is($org->{tokens}{output}, 16 * 500, 'each is charged what it produced');

$t->check_log;

done_testing;
