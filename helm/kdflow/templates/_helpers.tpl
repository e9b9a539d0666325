{{/* Full name: the release name, cut to 26 characters so "<fullname>-<workflow>"
fits KubeRay's RayCronJob limit (36) and the RayJob limit (47). */}}
{{- define "kdflow.fullname" -}}
{{- .Release.Name | trunc 26 | trimSuffix "-" -}}
{{- end -}}

{{- define "kdflow.labels" -}}
app.kubernetes.io/name: kdflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kdflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kdflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* RayJob / RayCronJob name, checked like kd/deploy/names.py (DNS-1035, 47 / 36). */}}
{{- define "kdflow.jobName" -}}
{{- if eq .Values.workflow "none" -}}
{{- fail "workflow: none runs no workflow; schedule.enabled needs one (teacher, distill, tune, retrain)" -}}
{{- end -}}
{{- $name := printf "%s-%s" (include "kdflow.fullname" .) .Values.workflow -}}
{{- $limit := ternary 36 47 (and .Values.schedule.enabled (eq .Values.schedule.kind "RayCronJob")) -}}
{{- if gt (len $name) $limit -}}
{{- fail (printf "release name: %s name %q has %d characters; KubeRay allows at most %d" (ternary "RayCronJob" "RayJob" (eq $limit 36)) $name (len $name) $limit) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "release name: %q is not a DNS-1035 label" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "kdflow.configMapName" -}}
{{- default (printf "%s-experiment" (include "kdflow.jobName" .)) .Values.experiment.existingConfigMap -}}
{{- end -}}

{{- define "kdflow.mlflowName" -}}
{{- printf "%s-mlflow" (include "kdflow.fullname" .) -}}
{{- end -}}

{{- define "kdflow.mlflowUri" -}}
{{- default (printf "http://%s:5000" (include "kdflow.mlflowName" .)) .Values.mlflow.trackingUri -}}
{{- end -}}

{{- define "kdflow.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Ray writes session files, logs and caches under /tmp and $HOME: root fs stays writable. */}}
{{- define "kdflow.raySecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
readOnlyRootFilesystem: false
runAsNonRoot: true
{{- end -}}

{{/* One Ray container; mirrors kd/deploy/render.py container(). Args: dict root name cpu memory gpus mount,
and serve (true: the Serve port 8000, probes, the webhook secret; RayService only). */}}
{{- define "kdflow.rayContainer" -}}
{{- $v := .root.Values -}}
name: {{ .name }}
image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
env:
  - name: MLFLOW_TRACKING_URI
    value: {{ include "kdflow.mlflowUri" .root | quote }}
  {{- if $v.s3.endpoint }}
  - name: AWS_ENDPOINT_URL_S3
    value: {{ $v.s3.endpoint | quote }}
  {{- end }}
  {{- if and .serve $v.serve.webhookSecret.name }}
  - name: KD_WEBHOOK_SECRET
    valueFrom:
      secretKeyRef:
        name: {{ $v.serve.webhookSecret.name }}
        key: {{ $v.serve.webhookSecret.key }}
  {{- end }}
{{- if .serve }}
ports:
  - name: serve
    containerPort: 8000
{{/* Ready when this pod's Serve proxy routes requests (KubeRay's own rule for RayService
pods); alive while its raylet answers the dashboard agent. */}}
readinessProbe:
  httpGet: {path: /-/healthz, port: 8000}
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
livenessProbe:
  httpGet: {path: /api/local_raylet_healthz, port: 52365}
  initialDelaySeconds: 30
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 12
{{- end }}
resources:
  {{- range list "requests" "limits" }}
  {{ . }}:
    cpu: {{ $.cpu | quote }}
    memory: {{ $.memory | quote }}
    {{- if $.gpus }}
    nvidia.com/gpu: {{ $.gpus | quote }}
    {{- end }}
  {{- end }}
securityContext:
  {{- include "kdflow.raySecurityContext" . | nindent 2 }}
{{- if $v.s3.existingSecret }}
envFrom:
  - secretRef:
      name: {{ $v.s3.existingSecret }}
{{- end }}
{{- if .mount }}
volumeMounts:
  - name: experiment
    mountPath: /etc/kdflow
    readOnly: true
{{- end }}
{{- end -}}

{{/* A Ray cluster: a CPU head that runs no tasks (num-cpus "0") and one worker group of
fixed size. Args: dict root mount serve group headCpu headMemory replicas cpu memory gpus gpuType
tolerate (GPU taint toleration). The RayJob's rayClusterSpec and the RayService's rayClusterConfig. */}}
{{- define "kdflow.rayCluster" -}}
{{- $root := .root -}}
rayVersion: {{ $root.Values.rayVersion | quote }}
headGroupSpec:
  rayStartParams:
    num-cpus: "0"
    dashboard-host: "0.0.0.0"
  template:
    metadata:
      labels:
        app.kubernetes.io/name: kdflow
        app.kubernetes.io/component: ray
        {{- if .serve }}
        app.kubernetes.io/part-of: kdflow-serve
        {{- end }}
    spec:
      serviceAccountName: {{ include "kdflow.serviceAccountName" $root }}
      automountServiceAccountToken: false
      securityContext:
        {{- include "kdflow.podSecurityContext" $root | nindent 8 }}
      containers:
        - {{- include "kdflow.rayContainer" (dict "root" $root "name" "ray-head" "cpu" .headCpu "memory" .headMemory "gpus" 0 "mount" .mount "serve" .serve) | nindent 10 }}
      {{- if .mount }}
      volumes:
        - name: experiment
          configMap:
            name: {{ include "kdflow.configMapName" $root }}
      {{- end }}
workerGroupSpecs:
  - groupName: {{ .group }}
    replicas: {{ .replicas }}
    minReplicas: {{ .replicas }}
    maxReplicas: {{ .replicas }}
    rayStartParams: {}
    template:
      metadata:
        labels:
          app.kubernetes.io/name: kdflow
          app.kubernetes.io/component: ray
          {{- if .serve }}
          app.kubernetes.io/part-of: kdflow-serve
          {{- end }}
      spec:
        serviceAccountName: {{ include "kdflow.serviceAccountName" $root }}
        automountServiceAccountToken: false
        securityContext:
          {{- include "kdflow.podSecurityContext" $root | nindent 10 }}
        {{- if .tolerate }}
        tolerations:
          - key: nvidia.com/gpu
            operator: Exists
            effect: NoSchedule
        {{- end }}
        {{- if .gpuType }}
        nodeSelector:
          nvidia.com/gpu.product: {{ .gpuType | quote }}
        {{- end }}
        containers:
          - {{- include "kdflow.rayContainer" (dict "root" $root "name" "ray-worker" "cpu" .cpu "memory" .memory "gpus" .gpus "mount" false "serve" .serve) | nindent 12 }}
{{- end -}}

{{/* RayJob spec around an entrypoint; mirrors kd/deploy/render.py rayjob_spec(). */}}
{{- define "kdflow.rayJobSpecFor" -}}
{{- $v := .root.Values -}}
entrypoint: {{ .entrypoint }}
shutdownAfterJobFinishes: true
ttlSecondsAfterFinished: {{ $v.job.ttlSecondsAfterFinished }}
activeDeadlineSeconds: {{ $v.job.activeDeadlineSeconds }}
preRunningDeadlineSeconds: {{ $v.job.preRunningDeadlineSeconds }}
backoffLimit: {{ .backoffLimit }}
submitterConfig:
  backoffLimit: {{ $v.job.submitterBackoffLimit }}
rayClusterSpec:
  {{- include "kdflow.rayCluster" .cluster | nindent 2 }}
{{- end -}}

{{/* The workflow's RayJob spec (`kd <workflow> /etc/kdflow/experiment.yaml` on the GPU group). */}}
{{- define "kdflow.rayJobSpec" -}}
{{- $v := .Values -}}
{{- $cluster := dict "root" . "mount" true "serve" false "group" "gpu" "headCpu" $v.head.cpu "headMemory" $v.head.memory "replicas" $v.workers.replicas "cpu" $v.workers.cpu "memory" $v.workers.memory "gpus" $v.gpu.count "gpuType" $v.gpu.type "tolerate" true -}}
{{- include "kdflow.rayJobSpecFor" (dict "root" . "entrypoint" (printf "kd %s /etc/kdflow/experiment.yaml" $v.workflow) "backoffLimit" $v.job.backoffLimit "cluster" $cluster) -}}
{{- end -}}

{{/* RayService name: "<fullname>-serve" (<= 32 characters; KubeRay adds "-serve-svc"). */}}
{{- define "kdflow.serveName" -}}
{{- printf "%s-serve" (include "kdflow.fullname" .) -}}
{{- end -}}
