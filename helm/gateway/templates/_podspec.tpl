{{/*
The pod spec of every gateway pod: the single-host Deployment's, and in multiHost mode the
LeaderWorkerSet's leader (`gateway serve --nnodes N --node-rank 0`, the HTTP server) and
workers (`gateway worker`, no HTTP: no port, probes or preStop). Called with
(dict "root" $ "worker" bool "resources" $resources).
*/}}
{{- define "gateway.podSpec" -}}
{{- $root := .root }}
{{- $worker := .worker }}
{{- $multi := $root.Values.multiHost.enabled }}
{{- $resources := .resources }}
{{- $apiKeySecret := include "gateway.apiKeySecretName" $root }}
serviceAccountName: {{ include "gateway.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if and $root.Values.gpu.enabled $root.Values.gpu.runtimeClassName }}
runtimeClassName: {{ $root.Values.gpu.runtimeClassName }}
{{- end }}
{{- with $root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: gateway
    image: {{ include "gateway.image" $root | quote }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: ["gateway"]
    args:
      {{- include (ternary "gateway.workerArgs" "gateway.args" $worker) $root | trim | nindent 6 }}
    {{- if and $multi (not $worker) }}
    ports:
      - name: http
        containerPort: {{ $root.Values.server.port }}
        protocol: TCP
      - name: rendezvous
        containerPort: {{ $root.Values.multiHost.port }}
        protocol: TCP
    {{- else if not $worker }}
    ports:
      - name: http
        containerPort: {{ $root.Values.server.port }}
        protocol: TCP
    {{- end }}
    {{- if not $worker }}
    {{- with $root.Values.shutdown.preStopSleepSeconds }}
    lifecycle:
      preStop:
        # Endpoints controllers and kube-proxy drop the pod from the Service meanwhile;
        # SIGTERM (the drain) follows. exec: the sleep action needs Kubernetes 1.30.
        exec:
          command: ["sleep", {{ . | int64 | quote }}]
    {{- end }}
    {{- end }}
    env:
      - name: HOME
        value: /tmp
      - name: XDG_CACHE_HOME
        value: {{ $root.Values.cache.mountPath | quote }}
      - name: HF_HOME
        value: {{ printf "%s/huggingface" $root.Values.cache.mountPath | quote }}
      - name: HF_HUB_OFFLINE
        value: "1"
      - name: TRITON_CACHE_DIR
        value: {{ printf "%s/triton" $root.Values.cache.mountPath | quote }}
      - name: TORCHINDUCTOR_CACHE_DIR
        value: {{ printf "%s/torchinductor" $root.Values.cache.mountPath | quote }}
      - name: PYTHONDONTWRITEBYTECODE
        value: "1"
      {{- if $apiKeySecret }}
      - name: GATEWAY_API_KEY
        valueFrom:
          secretKeyRef:
            name: {{ $apiKeySecret }}
            key: {{ include "gateway.apiKeySecretKey" $root }}
      {{- end }}
      {{- with $root.Values.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if not $worker }}
    startupProbe:
      httpGet:
        path: {{ $root.Values.probes.startup.path }}
        port: http
      periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
      failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
      timeoutSeconds: {{ $root.Values.probes.startup.timeoutSeconds }}
    livenessProbe:
      httpGet:
        path: {{ $root.Values.probes.liveness.path }}
        port: http
      periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
      failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
      timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds }}
    readinessProbe:
      httpGet:
        path: {{ $root.Values.probes.readiness.path }}
        port: http
      periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
      failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
      timeoutSeconds: {{ $root.Values.probes.readiness.timeoutSeconds }}
    {{- end }}
    {{- with $resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: cache
        mountPath: {{ $root.Values.cache.mountPath }}
      {{- if $root.Values.shm.enabled }}
      - name: shm
        mountPath: /dev/shm
      {{- end }}
      {{- if ne $root.Values.model.source "image" }}
      - name: model
        mountPath: {{ $root.Values.model.mountPath }}
        readOnly: true
      {{- end }}
      {{- with $root.Values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: {{ $root.Values.tmp.sizeLimit }}
  - name: cache
    emptyDir:
      sizeLimit: {{ $root.Values.cache.sizeLimit }}
  {{- if $root.Values.shm.enabled }}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $root.Values.shm.sizeLimit }}
  {{- end }}
  {{- if eq $root.Values.model.source "pvc" }}
  - name: model
    persistentVolumeClaim:
      claimName: {{ $root.Values.model.pvc.claimName }}
      readOnly: true
  {{- else if eq $root.Values.model.source "hostPath" }}
  - name: model
    hostPath:
      path: {{ $root.Values.model.hostPath.path }}
      type: Directory
  {{- end }}
  {{- with $root.Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
